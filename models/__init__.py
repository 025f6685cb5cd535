"""Model blocks, heads, the yaml parser and the model yaml files."""

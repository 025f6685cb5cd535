"""The docs checked against the code: the commands in the markdown, the package map of docs/internals.md."""

"""What every benchmark shares, one of each: the shared training flags on the project's
error-reporting parser (``cli``), the data a benchmark trains on (``data``), the runner of the entry
scripts (``runner``), the round-robin timer (``timer``), the command-line formatter (``commands``), the
machine description (``machine``) and the tables and results JSON (``results``). A benchmark imports
the product (``models``, ``utils``) and this package; nothing here re-implements a product path.
"""

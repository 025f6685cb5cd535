"""What every benchmark shares, one of each: the machine description (``machine``), the round-robin
timer (``timer``) and the command-line formatter (``commands``); the runner, the command-line parser
and the results writer still live in ``benchmarks/common.py`` and move here next. A benchmark imports
the product (``models``, ``utils``) and this package; nothing here re-implements a product path.
"""

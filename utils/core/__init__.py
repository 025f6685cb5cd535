"""The base every other part stands on: user-facing errors and the error-reporting argument parser
(``errors``), the project logger (``log``), run folders (``paths``), atomic file writes (``atomic``),
device selection, seeding, the torchrun environment and model wrappers (``device``) and the
settings-or-keywords rule of parameter objects (``options``). It imports nothing from the rest of
``utils`` and nothing from ``models``, so that ``models`` may import it (the only part of ``utils`` that
``models`` may import). Nothing runs at import.
"""

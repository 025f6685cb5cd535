"""Everything around the model, one package per concern (docs/internals.md has the map and the
allowed imports, tests/docs/test_layout.py enforces them): ``core`` (errors, logging, paths, atomic
writes, devices), ``ops`` (boxes, NMS, assigner), ``data``, ``convert``, ``distill``, ``engine``,
``eval``, ``export`` and ``checkpoint``, plus ``loss.py`` (DetectionLoss and the re-exported
DistillationLoss). Nothing runs at import.
"""

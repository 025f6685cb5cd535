"""The detector itself: blocks (``common``, ``backbones``), heads and their anchor points (``heads``,
``anchors``), the yaml parser and ``DetectionModel`` (``yolo``), model size and cost (``info``) and the
model yaml files (``detect/``). It imports nothing from ``utils`` but ``utils.core``, so a model builds
and runs without the data, training or export code.
"""

"""Pure tensor operations on boxes: formats, conversions, IoU and rescaling (``boxes``), non-maximum
suppression (``nms``) and the task-aligned assigner that matches predictions to ground truth
(``assigner``). Functions of tensors with their shapes in the docstrings and no state. It may import
``utils.core`` only (not ``models``); the anchor points and the distance encoding of the head live in
``models.anchors``.
"""

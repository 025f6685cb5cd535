"""From a trained model to the edge device: the ONNX export (``onnx``), FP16 / INT8 precision inside
the graph (``precision``, ``quantize``), TensorRT 10 / 11 engines (``trt``, ``trt_runtime``), structured
channel pruning before the fine-tune (``prune``) and the inference back-ends that run a ``.pt``,
``.onnx`` or ``.engine`` alike (``backends``). It may import ``utils.core``, ``utils.ops``,
``utils.data`` (INT8 calibration images), ``utils.checkpoint`` and ``models``; the training engine
never imports it.
"""

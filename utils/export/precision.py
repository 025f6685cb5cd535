"""Precision that lives in the ONNX graph: an FP16 graph for a strongly typed TensorRT build.

TensorRT 11 removed weak typing (no ``BuilderFlag.FP16``/``INT8``, no ``trtexec --fp16``): an engine
takes the types written in the ONNX. So the reduced precision is chosen here, at export time:

- **fp16**: weights and activations of the backbone, neck and head convolutions in FP16, converted
  with ``onnxconverter-common`` (``float16.convert_float_to_float16``). Kept in FP32: the decode
  part of the head (DFL softmax and its 1x1 conv, anchor points, strides, box maths in input
  pixels, the class sigmoid, the output transpose) and everything after it (NMS inputs), because
  box coordinates up to the image size lose whole pixels in FP16 and the anchor grid is exact only
  in FP32. The graph input and output stay FP32 (a Cast at each end) unless ``fp16_io``.
- **int8**: see :mod:`utils.export.quantize` (explicit Q/DQ); it uses :func:`keep_fp32_nodes` too.

The decode part is found from the graph, not from a list of op names: every node that is reached
from the head's conv branches (``/model/model.<head>/cv<k>...``, the names the TorchScript exporter
gives the head's modules) without being one of them, plus the constants only those nodes read.

The precision is stored in the metadata (``precision``: ``fp32``, ``fp16``, ``int8`` or
``int8-fp16``; ``io_dtype``: ``float32``/``float16``) for the TensorRT builder and ``trtexec`` line.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from typing import Iterable

FLOAT32 = 1  # onnx.TensorProto.FLOAT
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
# onnxconverter-common clamps FP32 constants into the FP16 range with these bounds; values that
# small (BatchNorm-folded biases near 0) or that large do not occur in a trained detector's convs
FP16_MIN_POSITIVE = 1e-7
FP16_MAX_FINITE = 1e4


def branch_pattern(head_index: int) -> re.Pattern:
    """Node names of the head's conv branches (box cv2/cv4..., class cv3/cv5...) for layer ``head_index``."""
    return re.compile(rf"^/model/model\.{int(head_index)}/cv\d+[./]")


def keep_fp32_nodes(graph, head_index: int) -> set[str]:
    """Names of the nodes that must stay FP32 and unquantized: the head's decode and what follows it.

    ``graph`` is an ``onnx.GraphProto`` in topological order (as exported). Raises ``ValueError``
    when no head branch is found (not a graph of our exporter).
    """
    branch = branch_pattern(head_index)
    live: set[str] = set()
    keep: list = []
    found = False
    for node in graph.node:
        if branch.match(node.name):
            found = True
            live.update(node.output)
        elif any(name in live for name in node.input):
            keep.append(node)
            live.update(node.output)
    if not found:
        raise ValueError(f"no node of the head (layer {head_index}) branches in the graph: not exported by export.py?")
    names = {node.name for node in keep}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    # then everything that feeds only kept nodes: the anchor grid and strides (constants, their
    # Unsqueeze/Expand, the Shape/Range nodes of a dynamic export), the DFL bin weights
    grown = True
    while grown:
        grown = False
        for node in graph.node:
            if node.name in names or branch.match(node.name):
                continue
            users = [user for out in node.output for user in readers.get(out, [])]
            if users and all(user in names for user in users):
                names.add(node.name)
                grown = True
    return names


def head_output_convs(graph, head_index: int) -> list[str]:
    """The last conv of every head branch (the 1x1 convs whose outputs are the raw DFL/class maps)."""
    branch = branch_pattern(head_index)
    outputs = {}
    for node in graph.node:
        if branch.match(node.name):
            for name in node.output:
                outputs[name] = node
    last = []
    for node in graph.node:
        if not branch.match(node.name):
            last += [outputs[name].name for name in node.input
                     if name in outputs and outputs[name].op_type == "Conv"]
    return sorted(set(last))


def inline_initializer_identities(model) -> int:
    """Let readers of ``Identity(initializer)`` read the initializer itself; returns the nodes removed.

    The TorchScript exporter writes one Identity per conv that shares a bias tensor with another
    (the zero biases of fused convs); quantizers expect a conv's bias to be an initializer.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        if node.output[0] in outputs:
            continue
        for reader in graph.node:
            reader.input[:] = [node.input[0] if x == node.output[0] else x for x in reader.input]
        graph.node.remove(node)
        removed += 1
    return removed


def _cast_to(node) -> int | None:
    """The ``to`` type of a Cast node, None for any other node."""
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _elem_types(model) -> dict[str, int]:
    """Element type of every typed tensor: value infos, graph inputs/outputs, initializers."""
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in (*graph.value_info, *graph.input, *graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types


def remove_fp16_round_trips(model, keep_fp32_outputs: bool) -> int:
    """Undo the FP32 -> FP16 -> FP32 Cast chains that the converter leaves between two FP32 nodes.

    ``convert_float_to_float16`` casts every output of a blocked node to FP16 and back to FP32 at
    the next blocked node; between two kept-FP32 nodes that only loses precision (box coordinates
    in pixels would be rounded to FP16 on the way). Readers of such a Cast-back read the FP32
    tensor directly; a Cast to FP16 nobody reads any more is removed. With ``keep_fp32_outputs`` a
    graph output written by a Cast to FP16 of an FP32 tensor becomes that FP32 tensor (an Identity).
    Returns the number of Cast nodes removed or replaced.
    """
    graph = model.graph
    types = _elem_types(model)
    outputs = {o.name: o for o in graph.output}
    changed = 0
    for cast in [n for n in graph.node if _cast_to(n) == FLOAT16 and types.get(n.input[0]) == FLOAT32]:
        source = cast.input[0]
        for back in [n for n in graph.node if cast.output[0] in n.input and _cast_to(n) == FLOAT32]:
            if back.output[0] in outputs:  # keep the output's name: the Cast-back becomes an Identity
                back.op_type, back.input[0] = "Identity", source
                del back.attribute[:]
            else:
                for node in graph.node:
                    node.input[:] = [source if name == back.output[0] else name for name in node.input]
                graph.node.remove(back)
            changed += 1
        still_read = any(cast.output[0] in n.input for n in graph.node)
        if cast.output[0] in outputs and keep_fp32_outputs:
            cast.op_type, cast.input[0] = "Identity", source
            del cast.attribute[:]
            outputs[cast.output[0]].type.tensor_type.elem_type = FLOAT32
            changed += 1
        elif not still_read and cast.output[0] not in outputs:
            graph.node.remove(cast)
            changed += 1
    return changed


def to_fp16(model, keep_fp32: Iterable[str]):
    """FP16 copy of an FP32 ``onnx.ModelProto``; the nodes named in ``keep_fp32`` stay FP32.

    Input and output stay FP32 (a Cast after the input, the decode is FP32 anyway); see
    :func:`fp16_input` / :func:`fp16_output` for FP16 I/O. Uses onnxconverter-common, then
    :func:`remove_fp16_round_trips`.
    """
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # the converter warns for every weight it clamps into the FP16 range (tiny folded biases)
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE, keep_io_types=True,
            node_block_list=sorted(keep_fp32))
    remove_fp16_round_trips(converted, keep_fp32_outputs=True)
    return converted


def fp16_input(model) -> None:
    """Make the FP32 graph input FP16 in place: the converter's Casts to FP16 after it are removed."""
    graph = model.graph
    name = graph.input[0].name
    for cast in [n for n in graph.node if _cast_to(n) == FLOAT16 and n.input[0] == name]:
        for node in graph.node:
            node.input[:] = [name if x == cast.output[0] else x for x in node.input]
        graph.node.remove(cast)
    graph.input[0].type.tensor_type.elem_type = FLOAT16


def fp16_output(model) -> None:
    """Cast the (FP32) graph outputs to FP16 in place, for callers that want FP16 buffers."""
    import onnx

    graph = model.graph
    for out in graph.output:
        if out.type.tensor_type.elem_type != FLOAT32:
            continue
        inner = f"{out.name}_fp32"
        for node in graph.node:
            node.output[:] = [inner if x == out.name else x for x in node.output]
            node.input[:] = [inner if x == out.name else x for x in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_to_fp16", to=FLOAT16))
        out.type.tensor_type.elem_type = FLOAT16


def precision_summary(model) -> dict[str, int]:
    """Counts that say what a graph computes in: ``conv_fp16``, ``conv_fp32`` (by weight type),
    ``conv_int8`` (convs fed by DequantizeLinear), ``quantize``, ``dequantize``, ``cast``."""
    graph = model.graph
    init_types = {init.name: init.data_type for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    counts: Counter = Counter()
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            counts["quantize"] += 1
        elif node.op_type == "DequantizeLinear":
            counts["dequantize"] += 1
        elif node.op_type == "Cast":
            counts["cast"] += 1
        elif node.op_type == "Conv":
            weight = node.input[1]
            producer = producers.get(weight)
            if producer is not None and producer.op_type == "DequantizeLinear":
                counts["conv_int8"] += 1
            elif init_types.get(weight) == FLOAT16:
                counts["conv_fp16"] += 1
            else:
                counts["conv_fp32"] += 1
    return {key: counts.get(key, 0) for key in ("conv_fp16", "conv_fp32", "conv_int8", "quantize", "dequantize",
                                                "cast")}

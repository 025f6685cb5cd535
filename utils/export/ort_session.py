"""The one place an ONNX Runtime ``InferenceSession`` is built (back-ends, benchmarks, scripts).

Providers follow the device: the CPU provider always, the CUDA provider first on a CUDA device when
the installed onnxruntime has it (a warning and the CPU otherwise; ``session.get_providers()[0]`` says
which one runs). Thread counts and the execution mode are the caller's (timings pin them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.core.log import LOGGER

ERRORS_ONLY = 3  # ONNX Runtime's log severity: errors and fatal only (its shape-inference notes are noise)
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def providers_for(device: str | torch.device) -> list[Any]:
    """ONNX Runtime providers for ``device``, best first: ``[(CUDA, {'device_id': i}), CPU]`` on a CUDA
    device whose provider is installed, else ``[CPU]``."""
    import onnxruntime as ort

    device = torch.device(device)
    providers: list[Any] = [CPU_PROVIDER]
    if device.type == "cuda" and CUDA_PROVIDER in ort.get_available_providers():
        providers.insert(0, (CUDA_PROVIDER, {"device_id": device.index or 0}))
    elif device.type == "cuda":
        LOGGER.warning("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); running on CPU")
    return providers


def ort_session(model: str | Path | bytes, device: str | torch.device = "cpu", *, threads: int | None = None,
                inter_op_threads: int | None = None, sequential: bool = False,
                log_severity: int = ERRORS_ONLY) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (a file or serialised ``ModelProto`` bytes).

    ``threads`` / ``inter_op_threads``: ONNX Runtime's intra- and inter-op pools (None: its default).
    ``sequential``: run the graph's nodes one after another. Raises ImportError without onnxruntime and
    ONNX Runtime's own exceptions for a file it cannot load (callers turn them into user messages).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers_for(device))

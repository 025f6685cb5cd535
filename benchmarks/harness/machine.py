"""The one description of the machine a benchmark ran on, written beside its results."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

NO_GPU = "none"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: str | torch.device = "") -> str:
    """The name of the GPU ``device`` selects (``''``: the first one), ``'none'`` on the CPU or without one."""
    from utils.core.device import select_device

    if not torch.cuda.is_available() or str(device) == "cpu":
        return NO_GPU
    selected = device if isinstance(device, torch.device) else select_device(device)
    return torch.cuda.get_device_name(selected) if selected.type == "cuda" else NO_GPU


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def machine_info(device: str | torch.device = "") -> dict:
    """``gpu`` (``'none'`` without one), ``cpu`` (model), ``cpus`` (count), ``torch``, ``python``,
    ``onnxruntime`` (None when not installed) and the ``date`` (ISO, local time zone)."""
    return {"gpu": gpu_name(device), "cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "onnxruntime": onnxruntime_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

"""Importing TensorRT and creating its CUDA objects, with one line that names the cause when it fails.

Two failures that TensorRT itself reports as a traceback:

- The Python package is there but its libraries are not: ``pip install tensorrt-cu12-bindings``
  alone, a half-finished ``pip install tensorrt``, or a TensorRT tarball without its ``lib/`` folder
  on ``LD_LIBRARY_PATH``. ``import tensorrt`` then raises ``ImportError: libnvinfer.so.10: cannot open
  shared object file`` (which library is named depends on the version); on Windows its loader
  raises ``FileNotFoundError: Could not find: nvinfer_10.dll ...``.
- The libraries load but CUDA cannot start (no driver, no visible GPU, a driver older than the CUDA
  that TensorRT was built for): ``trt.Builder(logger)`` and ``trt.Runtime(logger)`` get a null
  pointer from TensorRT's factory, which pybind11 raises as
  ``TypeError: pybind11::init(): factory function returned nullptr``.
"""

from __future__ import annotations

from typing import Any, Callable

from utils.core.errors import UserError

LIBRARIES_HINT = ("install the libraries of the same version (pip install tensorrt-cu12 brings tensorrt-cu12-libs) "
                  "or add TensorRT's lib folder to LD_LIBRARY_PATH")
NULLPTR_TEXT = "returned nullptr"  # pybind11's message when a factory returns no object


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tensorrt() -> Any:
    """The imported ``tensorrt`` module; :class:`UserError` when it is missing or cannot load its libraries."""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            raise UserError("TensorRT is not installed: pip install tensorrt-cu12 (or use the TensorRT of the "
                            "device, e.g. JetPack's)") from None
        raise UserError(f"TensorRT's Python package is incomplete ({_first_line(exc)}): {LIBRARIES_HINT}") from None
    except (ImportError, OSError) as exc:
        raise UserError(f"TensorRT's Python package is installed but cannot load its libraries "
                        f"({_first_line(exc)}): {LIBRARIES_HINT}") from None
    return tensorrt


def cuda_object(trt: Any, factory: Callable[[Any], Any], logger: Any) -> Any:
    """``factory(logger)`` for ``trt.Builder`` or ``trt.Runtime``; :class:`UserError` when TensorRT cannot
    start CUDA (the factory's null pointer, raised by pybind11 as a ``TypeError``). Other errors pass."""
    try:
        return factory(logger)
    except TypeError as exc:
        if NULLPTR_TEXT not in str(exc):
            raise
        version = getattr(trt, "__version__", "?")
        name = getattr(factory, "__name__", "object")
        raise UserError(f"TensorRT {version} cannot start CUDA (trt.{name}: {_first_line(exc)}): check the NVIDIA "
                        "driver and that nvidia-smi and CUDA_VISIBLE_DEVICES show the GPU") from None

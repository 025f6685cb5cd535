"""Reading official YOLOv9 checkpoints without letting the file run code.

An official ``.pt`` (WongKinYiu/yolov9) is a torch zip archive whose ``data.pkl`` pickles whole
modules (``models.yolo.DetectionModel``, ``models.common.RepNCSPELAN4``, ...). Unpickling it the
ordinary way imports and calls whatever the file names, so it is never done here. Instead a
``pickle.Unpickler`` subclass resolves only an explicit allowlist of globals (the ones the
official files contain, see ``shared/reference/yolov9/FACTS.md`` section 3):

- module classes become :class:`StandIn` objects that only record the state pickle hands them;
- tensors become :class:`TensorRecord` objects that read their bytes from the archive when (and
  only if) they are asked for, so optimizer state and the unused model copy are never loaded;
- the few value types (``OrderedDict``, ``set``, ``torch.Size``, numpy scalars/arrays for
  ``best_fitness`` and optimizer momenta) are rebuilt by their own inert constructors.

Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`UserError` naming it,
before anything is called. :func:`read_official` then walks the stand-in graph of the chosen
model and returns its yaml, class names and state_dict under the official key names;
``utils.checkpoint.ours`` builds our ``DetectionModel`` from that and loads the weights strictly.

The module graph of a real file is a DAG, not a tree: ``Conv`` and ``RepConvN`` take their
activation from a class attribute, so one SiLU object is referenced from every such block
(FACTS section 3, "Shared modules"). Shared modules are accepted; cycles are refused.
:func:`check_file` says what a file is when it is no complete zip archive (empty, cut off, a bare
pickle, not a pickle at all), reading a bare pickle only with the same restricted unpickler.
"""

from __future__ import annotations

import _compat_pickle
import collections
import importlib
import io
import pickle
import pickletools
import types
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from utils.core.errors import UserError

PICKLE_NAME = "data.pkl"
BYTEORDER_NAME = "byteorder"
NATIVE_BYTEORDER = b"little"
PERSISTENT_TAG = "storage"
PERSISTENT_ID_LEN = 5  # ('storage', storage type, key, location, numel)
PICKLE_TEXT_ENCODINGS = ("latin1", "latin-1")  # how protocol 2 writes bytes through _codecs.encode
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
PROTO_OPCODE, PROTOCOLS = 0x80, range(2, 6)  # a binary pickle starts with PROTO 2..5
ZIP_MAGIC = b"PK\x03\x04"  # a zip archive starts with a local file header
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of the pre-1.6 torch.save format
MAX_MODULE_PATHS = 200_000  # yolov9-e has about 4,000; a crafted DAG could have 2**depth
MAX_DATA_DEPTH = 32  # the model yaml is 4 levels deep

# Module classes that official YOLOv9 detection checkpoints pickle (s/t/m models, plus the
# CBLinear/CBFuse/ADown/Silence blocks of c/e models). Each one becomes an inert StandIn.
MODULE_CLASSES: frozenset[str] = frozenset(
    [f"models.common.{name}" for name in (
        "AConv", "ADown", "CBFuse", "CBLinear", "Concat", "Conv", "DFL", "ELAN1", "RepConvN",
        "RepNBottleneck", "RepNCSP", "RepNCSPELAN4", "SP", "SPPELAN", "Silence")]
    + [f"models.yolo.{name}" for name in ("DetectionModel", "DDetect", "DualDDetect", "Detect")]
    + [f"torch.nn.modules.{name}" for name in (
        "activation.SiLU", "batchnorm.BatchNorm2d", "container.Sequential", "container.ModuleList",
        "conv.Conv2d", "linear.Identity", "pooling.MaxPool2d", "upsampling.Upsample")]
)
DETECTION_MODEL_CLASS = "models.yolo.DetectionModel"

# Legacy typed-storage names that appear in the persistent ids of torch zip archives.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "torch.HalfStorage": torch.float16,
    "torch.FloatStorage": torch.float32,
    "torch.DoubleStorage": torch.float64,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
    "torch.UntypedStorage": torch.uint8,
}


def exception_text(exc: BaseException) -> str:
    """An exception's first line for a one-line message, without quote characters (a message
    must keep its own quotes balanced whatever the exception says)."""
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.replace("'", "").replace('"', "")


class StandIn:
    """Inert record of one pickled module: its official class name and its pickled ``__dict__``.

    Pickle creates it with ``cls.__new__`` and hands it the state through ``__setstate__``; it
    has no other behaviour, so nothing in the file can make it do anything.
    """

    official_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept (and ignore) constructor arguments, in case a pickle calls the class."""

    def __setstate__(self, state: Any) -> None:
        # pickle passes either the __dict__ or a (__dict__, slots) pair
        if isinstance(state, tuple) and len(state) == 2:
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"StandIn({self.official_name})"


@dataclass
class _Storage:
    """A storage named by the pickle: element dtype and the archive record that holds its bytes."""

    dtype: torch.dtype
    key: str
    archive: "_Archive"


@dataclass
class TensorRecord:
    """A tensor as the pickle describes it; :meth:`materialize` reads its bytes from the archive."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> torch.Tensor:
        """The tensor (CPU, the stored dtype). Only valid while the archive is open."""
        untyped = self.storage.archive.storage(self.storage.key)
        tensor = torch.empty((0,), dtype=self.storage.dtype)
        try:
            tensor.set_(untyped, self.offset, self.size, self.stride)
        except (RuntimeError, TypeError) as exc:
            raise UserError(f"{self.storage.archive.source}: tensor data is corrupt ({exception_text(exc)}); "
                            f"download or copy the file again") from exc
        return tensor


class _Archive:
    """The records of one torch zip archive (``<name>/data.pkl``, ``<name>/data/<key>``)."""

    def __init__(self, zf: zipfile.ZipFile, source: str):
        self.zf, self.source = zf, source
        self.archive_size = Path(zf.filename).stat().st_size if zf.filename else 0
        pickles = [n for n in zf.namelist() if n.endswith("/" + PICKLE_NAME) and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{source} is a zip archive but not a PyTorch checkpoint (no {PICKLE_NAME} inside)")
        self.prefix = pickles[0][: -len(PICKLE_NAME)]
        self._storages: dict[str, torch.UntypedStorage] = {}

    def has(self, name: str) -> bool:
        try:
            self.zf.getinfo(self.prefix + name)
        except KeyError:
            return False
        return True

    def read(self, name: str) -> bytes:
        try:
            info = self.zf.getinfo(self.prefix + name)
        except KeyError as exc:
            raise UserError(f"{self.source}: record {name} is missing, the file is corrupt") from exc
        # torch stores records uncompressed; a record larger than the file is a zip bomb
        if info.file_size > self.archive_size:
            raise UserError(f"{self.source}: record {name} unpacks to {info.file_size} bytes, more "
                            f"than the file holds; refused")
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise UserError(f"{self.source}: record {name} cannot be read ({exception_text(exc)}); the file is "
                            f"corrupt, download or copy it again") from exc

    def storage(self, key: str) -> torch.UntypedStorage:
        if key not in self._storages:
            data = bytearray(self.read(f"data/{key}"))
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            self._storages[key] = flat.untyped_storage()
        return self._storages[key]


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to what pickle protocol 2 uses it for: str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding not in PICKLE_TEXT_ENCODINGS:
        raise UserError(f"refusing _codecs.encode with encoding {encoding!r} in a pickle")
    return text.encode("latin-1")


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """Parameters are read as their plain data: gradients flags do not matter for loading."""
    return data


def _numpy_multiarray() -> types.ModuleType:
    """``numpy._core.multiarray`` (numpy 2) or ``numpy.core.multiarray`` (numpy 1.x)."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _value_globals() -> dict[str, Any]:
    """Allowed non-module globals: name in the pickle -> inert object that replaces it."""
    multiarray = _numpy_multiarray()
    table: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "__builtin__.set": set,
        "_codecs.encode": _latin1_encode,
        "torch.Size": torch.Size,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    # files written under numpy 1.x name numpy.core, numpy 2 writes numpy._core
    for package in ("numpy._core", "numpy.core"):
        table[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        table[f"{package}.multiarray.scalar"] = multiarray.scalar
    return table


class _StorageType:
    """What ``torch.HalfStorage`` & co. resolve to: only their element dtype is kept."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def readable_global(full: str) -> str:
    """A pickled global name for messages: ``'name'``, plus its Python 3 name when the pickle used
    the Python 2 one (protocol 2 writes ``__builtin__.eval`` for ``builtins.eval``)."""
    module, _, name = full.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    python3 = f"{module}.{name}"
    return f"'{full}'" if python3 == full else f"'{full}' (Python 3: '{python3}')"


def refused_global(source: str, full: str) -> UserError:
    """The one-line refusal of a file that asks for a global outside the allowlist."""
    return UserError(f"{source}: refused to load: the file asks for the Python global {readable_global(full)}, "
                     f"which no YOLOv9 or yolo-distill checkpoint contains and which could run code")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and never calls anything from the file.

    ``archive`` is the torch zip archive whose storages the pickle names; without one (a bare
    pickle file, read only to say what it is) any persistent id is refused.
    """

    def __init__(self, file: BinaryIO, source: str, archive: _Archive | None = None):
        super().__init__(file)
        self.source, self.archive = source, archive
        self._globals = _value_globals()
        self._globals["torch._utils._rebuild_tensor_v2"] = self._rebuild_tensor
        for name, dtype in STORAGE_DTYPES.items():
            self._globals[name] = _StorageType(dtype)
        for name in MODULE_CLASSES:
            self._globals[name] = type(name.rsplit(".", 1)[1], (StandIn,), {"official_name": name})

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._globals:
            raise refused_global(self.source, full)
        return self._globals[full]

    def persistent_load(self, pid: Any) -> _Storage:
        if self.archive is None or not (
                isinstance(pid, tuple) and len(pid) == PERSISTENT_ID_LEN and pid[0] == PERSISTENT_TAG
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UserError(f"{self.source}: unexpected persistent id in the pickle; the file is not a "
                            f"PyTorch checkpoint")
        return _Storage(pid[1].dtype, pid[2], self.archive)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        *unused: Any) -> TensorRecord:
        """Stands in for ``torch._utils._rebuild_tensor_v2``; the bytes are read later, on demand."""
        if not isinstance(storage, _Storage) or not isinstance(offset, int):
            raise UserError(f"{self.source}: malformed tensor in the pickle")
        try:
            return TensorRecord(storage, offset, tuple(int(s) for s in size),
                                tuple(int(s) for s in stride))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{self.source}: malformed tensor in the pickle") from exc


def _check_stream(stream: BinaryIO, size: int, source: str) -> None:
    """Static pass over the pickle opcodes (nothing is built or called) before unpickling.

    The C unpickler grows its memo table to the largest index a PUT names and fills it, so one
    crafted index would allocate tens of GB; a real pickle never names more entries than it
    has bytes. A stream that ends early or holds bytes that are no opcode raises UserError.
    """
    start = stream.tell()
    head = stream.read(2)
    stream.seek(start)
    is_pickle = len(head) == 2 and head[0] == PROTO_OPCODE and head[1] in PROTOCOLS
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in MEMO_OPCODES and (not isinstance(arg, int) or not 0 <= arg <= size):
                raise UserError(f"{source}: the pickle uses memo index {arg!r}; the file is corrupt")
    except UserError:
        raise
    except Exception as exc:  # pickletools reports a truncated or garbled stream this way
        if is_pickle:
            raise UserError(f"{source}: the pickle inside is cut off or corrupt ({exception_text(exc)}); "
                            f"download or copy the file again") from exc
        raise UserError(f"{source} is not a PyTorch checkpoint: its bytes are neither a zip archive nor a "
                        f"pickle (a text file, an image, or a damaged download?)") from exc
    finally:
        stream.seek(start)


def _restricted_load(stream: BinaryIO, size: int, source: str, archive: _Archive | None = None) -> Any:
    _check_stream(stream, size, source)
    try:
        return RestrictedUnpickler(stream, source, archive).load()
    except UserError:
        raise
    except Exception as exc:  # anything a malformed pickle can raise: it is a bad file, not a bug
        raise UserError(f"{source} is not a readable checkpoint ({type(exc).__name__}: {exception_text(exc)})") from exc


def check_file(path: str | Path) -> Path:
    """``path`` if it is a complete zip archive (how torch saves); else UserError saying what it is.

    Nothing in a file that is not a zip archive is ever executed: a bare pickle is read only by the
    restricted unpickler, to name the global it asks for or the kind of object it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes): the download or copy did not finish")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{path} is not a readable zip archive ({exception_text(exc)})") from exc
        if not any(n.endswith("/" + PICKLE_NAME) and n.count("/") == 1 for n in names):
            raise UserError(f"{path} is a zip archive but not a PyTorch checkpoint (no {PICKLE_NAME} inside)")
        return path
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            raise UserError(f"{path} is cut off: it starts as a PyTorch checkpoint (a zip archive) but its "
                            f"end is missing after {size} bytes; download or copy it again")
        f.seek(0)
        obj = _restricted_load(f, size, str(path))
    if isinstance(obj, int) and obj == LEGACY_TORCH_MAGIC:
        raise UserError(f"{path} uses the old non-zip PyTorch format (before torch 1.6), which is not "
                        f"read; save it again with a recent torch")
    raise UserError(f"{path} is a Python pickle but not a PyTorch checkpoint (it holds a "
                    f"{type(obj).__name__}, and torch writes zip archives)")


@dataclass
class OfficialModel:
    """What an official checkpoint holds for one model (the EMA or the raw training model).

    ``state_dict`` uses the official key names (``model.4.cv2.0.m.0.cv1.conv1.conv.weight``) and
    the stored dtypes (fp16 for official files).
    """

    yaml: dict
    nc: int
    names: list[str]
    state_dict: dict[str, torch.Tensor]
    stride: list[float] | None = None
    epoch: int = -1
    best_fitness: float = 0.0
    branch: str = "model"  # which entry of the file the weights came from: 'ema' or 'model'
    extra: dict = field(default_factory=dict)


def _standin_state_dict(root: StandIn, source: str) -> dict[str, torch.Tensor]:
    """Collect ``_parameters`` and persistent ``_buffers`` of a stand-in graph as a state_dict.

    The keys and their order are those of ``nn.Module.state_dict``: a module's own tensors, then
    its children's, depth first. The graph may be a DAG (official files share one activation
    object among many blocks; a shared module appears under every path, as in torch), but a
    module that contains itself is refused, and so is a graph with more than
    ``MAX_MODULE_PATHS`` paths (a crafted DAG can have exponentially many).
    """
    out: dict[str, torch.Tensor] = {}
    tensors: dict[int, torch.Tensor] = {}  # a tensor record reached twice is read once
    on_path: set[int] = set()  # modules between the root and the current one
    visits = 0
    stack: list[tuple[StandIn, str, bool]] = [(root, "", False)]
    while stack:
        node, prefix, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        where = prefix[:-1] or "the model"
        if id(node) in on_path:
            raise UserError(f"{source}: the pickled model is cyclic ({where} contains itself); "
                            f"the file is malformed")
        visits += 1
        if visits > MAX_MODULE_PATHS:
            raise UserError(f"{source}: the pickled model has more than {MAX_MODULE_PATHS} module paths; "
                            f"the file is malformed")
        on_path.add(id(node))
        stack.append((node, prefix, True))
        skip = node.state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            entries = node.state.get(group) or {}
            if not isinstance(entries, dict):
                raise UserError(f"{source}: malformed module {node.official_name} at {where} in the pickle")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRecord):
                    what = value.official_name if isinstance(value, StandIn) else type(value).__name__
                    raise UserError(f"{source}: {prefix}{name} should be a tensor but the pickle holds a "
                                    f"{what}; the file is malformed")
                if id(value) not in tensors:
                    tensors[id(value)] = value.materialize()
                out[f"{prefix}{name}"] = tensors[id(value)]
        children = node.state.get("_modules") or {}
        if not isinstance(children, dict):
            raise UserError(f"{source}: malformed module {node.official_name} at {where} in the pickle")
        for name, child in reversed(list(children.items())):
            if child is None:
                continue
            if not isinstance(child, StandIn):
                raise UserError(f"{source}: {prefix}{name} should be a module but the pickle holds a "
                                f"{type(child).__name__}; the file is malformed")
            stack.append((child, f"{prefix}{name}.", False))
    return out


def plain_data(value: Any, source: str, what: str, depth: int = 0) -> Any:
    """A copy of ``value`` if it is yaml-like data (dicts, lists, str, numbers, bool, None), else
    UserError. Depth is bounded, so a self-referencing pickled container is refused too."""
    if depth > MAX_DATA_DEPTH:
        raise UserError(f"{source}: the pickled {what} is nested more than {MAX_DATA_DEPTH} levels "
                        f"deep (or refers to itself); the file is malformed")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {plain_data(k, source, what, depth + 1): plain_data(v, source, what, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, source, what, depth + 1) for v in value]
    name = value.official_name if isinstance(value, StandIn) else type(value).__name__
    raise UserError(f"{source}: the pickled {what} holds a {name}, not plain data; the file is malformed")


def names_list(names: Any, nc: int) -> list[str]:
    """Class names as a list of ``nc`` strings from a list, tuple or ``{index: name}`` dict."""
    if isinstance(names, dict):
        found = {int(k): str(v) for k, v in names.items() if isinstance(k, int)}
    elif isinstance(names, (list, tuple)):
        found = {i: str(v) for i, v in enumerate(names)}
    else:
        found = {}
    return [found.get(i, str(i)) for i in range(nc)]


def _as_float(value: Any) -> float:
    """``best_fitness`` is a float, None, or a numpy array of shape (1,) in official files."""
    if isinstance(value, (int, float, np.generic)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size and value.dtype.kind in "fiu":
        return float(value.reshape(-1)[0])
    return 0.0


def _as_tensor_list(value: Any) -> list[float] | None:
    if isinstance(value, TensorRecord):
        return [float(v) for v in value.materialize().reshape(-1).tolist()]
    return None


def _unpickle(archive: _Archive) -> Any:
    if archive.has(BYTEORDER_NAME) and archive.read(BYTEORDER_NAME).strip() != NATIVE_BYTEORDER:
        raise UserError(f"{archive.source} was written on a big-endian machine, which is not supported")
    data = archive.read(PICKLE_NAME)
    return _restricted_load(io.BytesIO(data), len(data), archive.source, archive)


def read_official(path: str | Path, prefer_ema: bool = True) -> OfficialModel:
    """Read one model of an official YOLOv9 checkpoint without running any code from it.

    Args:
        path: a ``.pt`` written by the official code: a training checkpoint (``model`` and
            ``ema``, FP16), a stripped one (``ema`` None) or a converted gelan one (``epoch`` -1).
        prefer_ema: use ``ckpt['ema']`` when it is present, else ``ckpt['model']`` (the rule of
            the official ``attempt_load``).

    Returns:
        :class:`OfficialModel` with the model yaml dict, ``nc``, class names (list), state_dict
        (official keys, stored dtypes) and the pickled head strides.

    Raises:
        UserError: missing file, not a zip/torch archive, a global outside the allowlist, or no
            detection model in the file.
    """
    path = check_file(path)
    source = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable zip archive ({exception_text(exc)})") from exc
    with zf:
        archive = _Archive(zf, source)
        ckpt = _unpickle(archive)
        if not isinstance(ckpt, dict):
            raise UserError(f"{source} is not a checkpoint (it holds a {type(ckpt).__name__}, "
                            f"not a dict with a model)")
        ema = ckpt.get("ema")
        branch = "ema" if prefer_ema and isinstance(ema, StandIn) else "model"
        node = ckpt.get(branch)
        if node is None:
            raise UserError(f"{source} is not a checkpoint: it has no 'model' entry")
        if not isinstance(node, StandIn) or node.official_name != DETECTION_MODEL_CLASS:
            raise UserError(f"{source}: ckpt['{branch}'] is not a YOLOv9 DetectionModel")
        cfg = node.state.get("yaml")
        if not isinstance(cfg, dict):
            raise UserError(f"{source}: the pickled model carries no yaml dict to rebuild it from")
        cfg = plain_data(cfg, source, "model yaml")
        nc = node.state.get("nc")
        if not isinstance(nc, int):
            nc = cfg.get("nc")
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise UserError(f"{source}: the pickled model has no valid class count (nc={nc!r})")
        state_dict = _standin_state_dict(node, source)
        epoch = ckpt.get("epoch")
        return OfficialModel(
            yaml=cfg, nc=nc, names=names_list(node.state.get("names"), nc), state_dict=state_dict,
            stride=_as_tensor_list(node.state.get("stride")),
            epoch=epoch if isinstance(epoch, int) else -1,
            best_fitness=_as_float(ckpt.get("best_fitness")), branch=branch,
            extra={"date": ckpt.get("date") if isinstance(ckpt.get("date"), str) else None})

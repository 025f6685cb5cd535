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
before anything is called. :func:`read_official` then walks the stand-in tree of the chosen
model and returns its yaml, class names and state_dict under the official key names;
``utils.checkpoint`` builds our ``DetectionModel`` from that and loads the weights strictly.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from utils.errors import UserError

PICKLE_NAME = "data.pkl"
BYTEORDER_NAME = "byteorder"
NATIVE_BYTEORDER = b"little"
PERSISTENT_TAG = "storage"
PERSISTENT_ID_LEN = 5  # ('storage', storage type, key, location, numel)
PICKLE_TEXT_ENCODINGS = ("latin1", "latin-1")  # how protocol 2 writes bytes through _codecs.encode
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

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
            raise UserError(f"{self.storage.archive.source}: tensor data is corrupt ({exc})") from exc
        return tensor


class _Archive:
    """The records of one torch zip archive (``<name>/data.pkl``, ``<name>/data/<key>``)."""

    def __init__(self, zf: zipfile.ZipFile, source: str):
        self.zf, self.source = zf, source
        self.archive_size = Path(zf.filename).stat().st_size if zf.filename else 0
        pickles = [n for n in zf.namelist() if n.endswith("/" + PICKLE_NAME) and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{source} is a zip file but not a PyTorch checkpoint (no {PICKLE_NAME})")
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
        return self.zf.read(info)

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


def _value_globals() -> dict[str, Any]:
    """Allowed non-module globals: name in the pickle -> inert object that replaces it."""
    multiarray = np._core.multiarray
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
    """A pickled global name for messages, with its Python 3 name when the pickle used the
    Python 2 one (protocol 2 writes ``commands.Popen`` for ``subprocess.Popen``)."""
    module, _, name = full.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    python3 = f"{module}.{name}"
    return full if python3 == full else f"{full}' (Python 3: '{python3}"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and never calls anything from the file."""

    def __init__(self, file: BinaryIO, archive: _Archive):
        super().__init__(file)
        self.archive = archive
        self._globals = _value_globals()
        self._globals["torch._utils._rebuild_tensor_v2"] = self._rebuild_tensor
        for name, dtype in STORAGE_DTYPES.items():
            self._globals[name] = _StorageType(dtype)
        for name in MODULE_CLASSES:
            self._globals[name] = type(name.rsplit(".", 1)[1], (StandIn,), {"official_name": name})

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._globals:
            raise UserError(f"{self.archive.source}: refused to load, the file asks for the Python "
                            f"global '{readable_global(full)}', which is not part of a "
                            f"YOLOv9 checkpoint (it could run code)")
        return self._globals[full]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == PERSISTENT_ID_LEN and pid[0] == PERSISTENT_TAG
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UserError(f"{self.archive.source}: unexpected persistent id in the pickle, the file "
                            f"is not a PyTorch checkpoint")
        return _Storage(pid[1].dtype, pid[2], self.archive)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        *unused: Any) -> TensorRecord:
        """Stands in for ``torch._utils._rebuild_tensor_v2``; the bytes are read later, on demand."""
        if not isinstance(storage, _Storage) or not isinstance(offset, int):
            raise UserError(f"{self.archive.source}: malformed tensor in the pickle")
        try:
            return TensorRecord(storage, offset, tuple(int(s) for s in size),
                                tuple(int(s) for s in stride))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{self.archive.source}: malformed tensor in the pickle") from exc


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
    """Collect ``_parameters`` and persistent ``_buffers`` of a stand-in tree as a state_dict."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # a crafted pickle can make the module graph cyclic
    stack: list[tuple[StandIn, str]] = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if id(node) in seen:
            raise UserError(f"{source}: the pickled model reuses a module, the file is malformed")
        seen.add(id(node))
        skip = node.state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            entries = node.state.get(group) or {}
            if not isinstance(entries, dict):
                raise UserError(f"{source}: malformed module {node.official_name} in the pickle")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRecord):
                    raise UserError(f"{source}: {prefix}{name} is not a tensor in the pickle")
                out[f"{prefix}{name}"] = value.materialize()
        children = node.state.get("_modules") or {}
        if not isinstance(children, dict):
            raise UserError(f"{source}: malformed module {node.official_name} in the pickle")
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, StandIn):
                raise UserError(f"{source}: {prefix}{name} is not a module in the pickle")
            stack.append((child, f"{prefix}{name}."))
    return out


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


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch checkpoint (not a zip archive)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable zip archive ({exc})") from exc


def _check_stream(data: bytes, source: str) -> None:
    """Static pass over the pickle opcodes (nothing is built or called) before unpickling.

    The C unpickler grows its memo table to the largest index a PUT names and fills it, so one
    crafted index would allocate tens of GB; a real pickle never names more entries than it
    has bytes.
    """
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name in MEMO_OPCODES and (not isinstance(arg, int) or not 0 <= arg <= len(data)):
                raise UserError(f"{source}: the pickle uses memo index {arg!r}, the file is corrupt")
    except UserError:
        raise
    except Exception as exc:  # pickletools reports a truncated or garbled stream this way
        raise UserError(f"{source} is not a readable checkpoint (corrupt pickle: {exc})") from exc


def _unpickle(archive: _Archive) -> Any:
    if archive.has(BYTEORDER_NAME) and archive.read(BYTEORDER_NAME).strip() != NATIVE_BYTEORDER:
        raise UserError(f"{archive.source} was written on a big-endian machine, which is not supported")
    data = archive.read(PICKLE_NAME)
    _check_stream(data, archive.source)
    try:
        return RestrictedUnpickler(io.BytesIO(data), archive).load()
    except UserError:
        raise
    except Exception as exc:  # anything a malformed pickle can raise: it is a bad file, not a bug
        raise UserError(f"{archive.source} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


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
    path = Path(path)
    source = str(path)
    with _open_archive(path) as zf:
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

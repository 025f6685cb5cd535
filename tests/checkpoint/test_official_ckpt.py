"""Official YOLOv9 checkpoints: every layout and model loads, safely, with the official weights and outputs.

The files are written by tests/fixtures/official_ckpt_fixtures.py, which reproduces the object graph of the
public code from FACTS.md (no release file can be downloaded here). The first tests check the
fixture writer itself against the measured facts; the others check our loader against its files.
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import official_ckpt_fixtures as fx
from models.heads import branch_maps
from models.yolo import reparameterize
from utils.checkpoint.cli import main as checkpoint_main
from utils.checkpoint.official import MODULE_CLASSES, read_official
from utils.checkpoint.ours import load_checkpoint, load_model
from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "fixtures" / "yolov9-keys"  # measured key lists, copied from shared/reference/yolov9
NAMES = ["RBC", "WBC", "Platelets"]  # BCCD, in data/bccd.yaml order
NC = len(NAMES)
IMG = 64
CLOSE = {"rtol": 1e-5, "atol": 1e-4}  # float32 tolerance (boxes are in pixels)
# train mode normalises with the statistics of a batch of 2, which amplifies the rounding differences
# of a reordered sum (CBFuse adds its inputs in another order than the public code)
CLOSE_TRAIN = {"rtol": 1e-4, "atol": 1e-3}

# FACTS.md section 1: (params at nc=80, params at nc=3, state_dict keys, layers), unfused
MEASURED = {
    "yolov9-t": (3_717_680, 2_660_066, 1772, 30), "yolov9-s": (9_804_512, 9_744_914, 1772, 30),
    "yolov9-m": (32_878_432, 32_767_090, 1412, 39), "yolov9-c": (51_182_080, 51_004_210, 1460, 39),
    "yolov9-e": (69_529_664, 69_410_930, 2172, 50), "gelan-t": (2_442_640, 1_913_833, 1339, 23),
    "gelan-s": (7_226_208, 7_196_409, 1339, 23), "gelan-m": (20_124_000, 20_068_329, 907, 23),
    "gelan-c": (25_498_752, 25_439_385, 937, 23), "gelan-e": (58_114_432, 58_055_065, 1811, 43),
}
# FACTS.md section 3: the GLOBALs of a yolov9-s training checkpoint
S_GLOBALS = frozenset(
    [f"models.common.{n}" for n in ("AConv", "Concat", "Conv", "DFL", "ELAN1", "RepConvN", "RepNBottleneck",
                                    "RepNCSP", "RepNCSPELAN4", "SP", "SPPELAN")]
    + ["models.yolo.DetectionModel", "models.yolo.DualDDetect"]
    + [f"torch.nn.modules.{n}" for n in ("activation.SiLU", "batchnorm.BatchNorm2d", "container.Sequential",
                                         "container.ModuleList", "conv.Conv2d", "linear.Identity",
                                         "pooling.MaxPool2d", "upsampling.Upsample")]
    + ["torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch.HalfStorage",
       "torch.FloatStorage", "torch.LongStorage", "torch.Size", "collections.OrderedDict", "__builtin__.set",
       "_codecs.encode", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
       "numpy.ndarray", "numpy.dtype"])
TRAINING_ONLY_GLOBALS = {"_codecs.encode", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
                         "numpy.ndarray", "numpy.dtype"}
C_E_BLOCKS = {f"models.common.{n}" for n in ("ADown", "CBLinear", "CBFuse", "Silence")}
# FACTS.md section 3, "Shared modules": the RepConvN activation has 42 parents in gelan-s, 54 in yolov9-s
REPCONV_ACT_PARENTS = {"gelan-s": 42, "yolov9-s": 54}
FULL_SIZE = ("yolov9-t", "yolov9-s", "gelan-t", "gelan-s")  # the others are written narrow (1/8 widths)


class Files:
    """Writes each official fixture file once per test module (they are slow to build)."""

    def __init__(self, folder: Path):
        self.folder, self._models, self._files = folder, {}, {}

    def model(self, name: str, nc: int = NC) -> fx.DetectionModel:
        key = (name, nc)
        if key not in self._models:
            self._models[key] = fx.build(name, nc, narrow=name not in FULL_SIZE, seed=len(self._models))
        return self._models[key]

    def get(self, name: str, layout: str, nc: int = NC, names: tuple[str, ...] = tuple(NAMES),
            **flavour: bool) -> fx.OfficialFile:
        key = (name, layout, nc, names, tuple(sorted(flavour.items())))
        if key not in self._files:
            tag = "".join(f"-{k}" for k, v in sorted(flavour.items()) if v)
            path = self.folder / f"{name}-{layout}{tag}-nc{nc}.pt"
            model, names_list = self.model(name, nc), list(names)
            if layout == "training":
                written = fx.write_training(path, model, names_list, **flavour)
            elif layout == "stripped":
                written = fx.write_stripped(path, model, names_list, **flavour)
            else:
                written = fx.write_converted(path, model, names_list, narrow=name not in FULL_SIZE)
            self._files[key] = written
        return self._files[key]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("official"))


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _assert_same_outputs(ours: torch.nn.Module, graph: torch.nn.Module, size: int = IMG) -> None:
    """Eval outputs (decoded + raw maps) and train-mode maps of both models agree to float tolerance.

    Runs on copies: a train-mode forward moves the BatchNorm statistics of the models it runs on.
    """
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        for training, tolerance in ((False, CLOSE), (True, CLOSE_TRAIN)):
            a, b = copy.deepcopy(ours).train(training), copy.deepcopy(graph).train(training)
            got, want = _flat(a(x)), _flat(b(x))
            assert len(got) == len(want)
            for u, v in zip(got, want):
                torch.testing.assert_close(u, v, **tolerance)


def _assert_same_weights(model: torch.nn.Module, pickled: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert list(ours) == list(pickled)
    for key, tensor in pickled.items():
        assert torch.equal(ours[key], tensor.to(ours[key].dtype)), key


# ------------------------------------------------------------------------------ the fixture writer
@pytest.mark.parametrize("name", sorted(MEASURED))
def test_fixture_builds_the_measured_models(name):
    params80, params3, keys, layers = MEASURED[name]
    for nc, params in ((80, params80), (NC, params3)):
        model = fx.build(name, nc, structure_only=True)
        assert sum(p.numel() for p in model.parameters()) == params
        assert len(model.state_dict()) == keys and len(model.model) == layers


@pytest.mark.parametrize("name", ["yolov9-s", "gelan-s"])
def test_fixture_state_dict_is_the_measured_key_list(name):
    measured = [tuple(line.split("\t")) for line in (REFERENCE / f"{name}-keys.txt").read_text().splitlines()]
    model = fx.build(name, 80, structure_only=True)
    mine = [(k, str(list(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert mine == measured


def test_fixture_files_pickle_the_measured_globals(files):
    training = files.get("yolov9-s", "training")
    assert fx.pickle_globals(training.path) == S_GLOBALS
    assert fx.pickle_globals(files.get("yolov9-s", "stripped").path) == S_GLOBALS - TRAINING_ONLY_GLOBALS
    gelan_globals = {g.replace("DualDDetect", "DDetect") for g in S_GLOBALS}
    assert fx.pickle_globals(files.get("yolov9-s", "converted").path) == \
        gelan_globals - TRAINING_ONLY_GLOBALS - {"torch.Size"}
    assert C_E_BLOCKS <= fx.pickle_globals(files.get("yolov9-c", "stripped").path)
    assert C_E_BLOCKS <= fx.pickle_globals(files.get("gelan-e", "stripped").path)

    numpy1 = fx.pickle_globals(files.get("yolov9-t", "training", numpy1=True).path)
    assert {"numpy.core.multiarray._reconstruct", "numpy.core.multiarray.scalar"} <= numpy1
    assert not any(g.startswith("numpy._core") for g in numpy1)

    data = fx.pickle_bytes(training.path)
    assert data[:2] == b"\x80\x02" and b"cuda:0" in data  # protocol 2; storages of a GPU run
    assert b"_forward_hooks_with_kwargs" in data  # torch 2.x module attributes ...
    torch1 = files.get("yolov9-t", "training", torch1=True).path
    assert b"_forward_hooks_with_kwargs" not in fx.pickle_bytes(torch1)  # ... that torch 1.13 does not write
    with zipfile.ZipFile(torch1) as zf:  # and no byteorder record
        assert {n.split("/", 1)[1] for n in zf.namelist() if "/data/" not in n} == {"data.pkl", "version"}


def test_fixture_shares_one_activation_per_block_class(files):
    for name, parents in REPCONV_ACT_PARENTS.items():
        graph = files.get(name, "stripped").graph
        shared = fx.shared_modules(graph)
        assert [n for n, _ in shared] == ["SiLU", "SiLU"]  # Conv.default_act and RepConvN.default_act
        assert parents in [count for _, count in shared]
        # the file creates those two SiLU objects once each, and refers back to them from every block
        assert fx.count_instances(fx.pickle_bytes(files.get(name, "stripped").path), fx.SILU_GLOBAL) == 2


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("name, layout, flavour", [
    ("yolov9-s", "training", {}),
    ("yolov9-s", "stripped", {}),
    ("gelan-t", "training", {}),
    ("yolov9-t", "training", {"numpy1": True}),
    ("yolov9-t", "training", {"torch1": True}),
    ("gelan-t", "stripped", {"numpy1": True}),
], ids=["yolov9-s-training", "yolov9-s-stripped", "gelan-t-training", "numpy1", "torch1", "gelan-t-numpy1"])
def test_layouts_load_the_pickled_weights_and_outputs(files, name, layout, flavour):
    official = files.get(name, layout, **flavour)
    read = read_official(official.path)
    assert read.branch == ("ema" if layout == "training" else "model")
    assert list(read.state_dict) == list(official.state_dict)
    assert all(torch.equal(read.state_dict[k], v) for k, v in official.state_dict.items())  # fp16 as stored
    assert read.epoch == (fx.EPOCH if layout == "training" else -1)
    if layout == "training":
        assert read.best_fitness == pytest.approx(fx.BEST_FITNESS)

    model = load_model(official.path)
    assert not model.training and model.names == NAMES and model.nc == NC
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_same_weights(model, official.state_dict)
    _assert_same_outputs(model, official.graph)
    if layout == "training":  # ckpt['model']: the raw weights, not the EMA
        raw = load_model(official.path, prefer_ema=False)
        _assert_same_weights(raw, official.raw_state_dict)
        _assert_same_outputs(raw, official.raw)


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_every_model_loads_with_the_official_outputs(files, name):
    official = files.get(name, "stripped")
    model = load_model(official.path)
    _assert_same_weights(model, official.state_dict)
    _assert_same_outputs(model, official.graph)
    if name.startswith("yolov9"):  # the dual model has the gelan layout once reparameterized (FACTS section 2)
        converted = files.get(name, "converted")
        gelan = load_model(converted.path)
        assert len(gelan.model) == MEASURED[name.replace("yolov9", "gelan")][3]
        _assert_same_weights(gelan, converted.state_dict)
        _assert_same_outputs(gelan, converted.graph)
        x = torch.rand(1, 3, IMG, IMG)
        with torch.no_grad():
            (y, maps), (dual_y, dual_maps) = gelan(x), converted.extra["source"](x)
            ours = reparameterize(load_model(official.path)).eval()(x)  # our reparameterization = the notebook's
        torch.testing.assert_close(y, dual_y[1], **CLOSE)  # the main branch (val_dual uses pred[0][1])
        for a, b, c in zip(maps, dual_maps[1], ours[1]):
            torch.testing.assert_close(a, b, **CLOSE)
            torch.testing.assert_close(c, a, **CLOSE)


def _crafted(files: Files, tmp_path: Path, edit) -> Path:
    """A stripped narrow gelan-t file whose pickled graph ``edit`` changed before saving."""
    graph = copy.deepcopy(files.get("gelan-t", "stripped").graph).half()
    edit(graph)
    ckpt = {"epoch": -1, "best_fitness": None, "model": graph, "ema": None, "updates": None, "optimizer": None,
            "opt": {}, "git": None, "date": fx.DATE}
    return fx.save(ckpt, tmp_path / "crafted.pt")


def _chain_bomb(graph) -> None:
    """A DAG of 40 levels, each node referencing the next twice: 2**40 paths, 41 objects."""
    nodes = [torch.nn.Sequential() for _ in range(40)]
    for parent, child in zip(nodes, nodes[1:]):
        parent._modules["a"] = parent._modules["b"] = child
    graph.model[0]._modules["bomb"] = nodes[0]


def _module_in_parameters(graph) -> None:
    graph.model[0].conv._parameters["weight"] = torch.nn.SiLU()


def _tensor_in_modules(graph) -> None:
    graph.model[0]._modules["bn"] = torch.zeros(3)


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.model[0]._modules.__setitem__("loop", g.model), "cyclic"),
    (_chain_bomb, "module paths"),
    (_module_in_parameters, "model.0.conv.weight should be a tensor but the pickle holds a"),
    (_tensor_in_modules, "model.0.bn should be a module but the pickle holds a Tensor"),
], ids=["cycle", "exponential-dag", "module-for-tensor", "tensor-for-module"])
def test_malformed_module_graphs_are_refused(files, tmp_path, edit, message):
    path = _crafted(files, tmp_path, edit)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_a_module_shared_by_two_parents_loads(files, tmp_path):
    """A module with weights referenced from two places (weight tying) is a DAG, not an error:
    its tensors appear under both paths, as in torch's state_dict."""
    def tie(graph):
        bottlenecks = graph.model[4].cv2[0].m  # three RepNBottlenecks of the same shape
        bottlenecks._modules["1"] = bottlenecks[0]

    path = _crafted(files, tmp_path, tie)
    graph = copy.deepcopy(files.get("gelan-t", "stripped").graph)
    tie(graph)
    model = load_model(path)
    prefix = "model.4.cv2.0.m."
    ours = model.state_dict()
    for key, tensor in graph.state_dict().items():
        if key.startswith(prefix + "0."):
            assert torch.equal(ours[key], ours[key.replace(prefix + "0.", prefix + "1.")])
        stored = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(ours[key], stored), key
    _assert_same_outputs(model, graph.half().float())


# ------------------------------------------------------------------------------ refusals
def _other_yaml(name: str, narrow: bool = True):
    def edit(graph) -> None:
        graph.yaml = fx.official_yaml(name, narrow=narrow)
        graph.yaml.update(nc=NC, ch=3)
    return edit


def _one_line_exit_2(capsys, main, argv: list[str], path: Path) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and err.count("'") % 2 == 0 and err.count('"') % 2 == 0
    return err


def _val_main(path: Path, data: str) -> tuple:
    import val
    return val.main, ["--weights", str(path), "--data", data, "--img", str(IMG), "--workers", "0",
                      "--device", "cpu", "--noplots"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    from utils.data.synthetic import generate
    return str(generate(tmp_path_factory.mktemp("synthetic"), n_train=0, n_val=4, img_size=IMG, seed=3))


class _Payload:
    """Pickles as a call ``func(*args)``: what a malicious checkpoint hides."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle wants a callable first item; a chain uses a payload's result
        raise AssertionError("a payload is never called while pickling")


def _malicious_zip(files: Files, tmp_path: Path, payload) -> Path:
    def hide(graph):
        graph.model[3].cv1.np = payload  # deep in the module graph of an otherwise valid file
    return _crafted(files, tmp_path, hide)


def test_refusals_are_one_line_with_exit_code_2(files, tmp_path, capsys, synthetic):
    marker = tmp_path / "pwned"
    good = files.get("gelan-t", "stripped").path
    cases = []

    def case(name: str, expected: str) -> Path:
        path = tmp_path / name
        cases.append((path, expected))
        return path

    # gelan-t weights with the yolov9-t yaml: layers 0-21 agree, layer 22 does not
    _crafted(files, tmp_path, _other_yaml("yolov9-t", narrow=False)).rename(case(
        "mismatch.pt", "layer 22 (SPPELAN) has no cv2.0 but the file holds 'model.22.cv2.0.0.conv.weight'"))
    _crafted(files, tmp_path, _other_yaml("gelan-t", narrow=True)).rename(case(  # same layers, other widths
        "widths.pt", "'model.0.conv.weight' of layer 0 (Conv) is [16, 3, 3, 3] in the file but [8, 3, 3, 3]"))
    bare_model = copy.deepcopy(files.get("gelan-t", "stripped").graph).half()
    fx.save(bare_model, case("bare-model.pt", "holds a DetectionModel"))
    torch.save({"epoch": 3}, case("dict.pt", "no 'format' entry"))
    case("pickle.pt", "is a Python pickle but not a PyTorch checkpoint").write_bytes(pickle.dumps({"a": 1}, 4))
    case("text.pt", "neither a zip archive nor a pickle").write_text("<html>404 Not Found</html>\n")
    case("empty.pt", "is empty").write_bytes(b"")
    data = good.read_bytes()
    case("cut.pt", "is cut off").write_bytes(data[: len(data) * 3 // 5])
    _malicious_zip(files, tmp_path, _Payload(os.system, f"touch {marker}")).rename(
        case("evil.pt", "refused to load: the file asks for the Python global 'posix.system'"))
    case("evil4.pt", "refused to load: the file asks for the Python global 'posix.system'").write_bytes(
        pickle.dumps({"model": _Payload(os.system, f"touch {marker}")}, protocol=4))

    for path, expected in cases:
        err = _one_line_exit_2(capsys, *_val_main(path, synthetic), path=path)
        assert expected in err, err
    assert not marker.exists()
    # the same one line from the other entry points
    import detect_dual
    import export
    evil = tmp_path / "evil.pt"
    images = str(Path(synthetic).parent / "images" / "val")
    for main, argv in ((export.main, ["--weights", str(evil), "--include", "onnx", "--device", "cpu"]),
                       (detect_dual.main, ["--weights", str(evil), "--source", images, "--device", "cpu"]),
                       (checkpoint_main, ["convert", str(evil), str(tmp_path / "out.pt")])):
        assert "posix.system" in _one_line_exit_2(capsys, main, argv, evil)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------------------ security
def _numpy_pickle(marker: Path, tmp_path: Path) -> Path:
    """An .npy holding an object array whose pickle runs os.system: np.load(p, None, True) would run it."""
    inner = tmp_path / "inner.npy"
    np.save(inner, np.array([_Payload(os.system, f"touch {marker}")], dtype=object), allow_pickle=True)
    return inner


def _torch_file(marker: Path, tmp_path: Path) -> Path:
    inner = tmp_path / "inner.pt"
    torch.save({"x": _Payload(os.system, f"touch {marker}")}, inner)
    return inner


PAYLOADS = {
    "os.system": (lambda m, t: _Payload(os.system, f"touch {m}"), "posix.system"),
    "subprocess.Popen": (lambda m, t: _Payload(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
    "eval": (lambda m, t: _Payload(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
    "exec": (lambda m, t: _Payload(exec, f"open({str(m)!r}, 'w')"), "builtins.exec"),
    "getattr-chain": (lambda m, t: _Payload(_Payload(getattr, _Payload(__import__, "os"), "system"), f"touch {m}"),
                      "builtins.getattr"),
    "torch.load": (lambda m, t: _Payload(torch.load, str(_torch_file(m, t))), "torch.serialization.load"),
    "numpy.load": (lambda m, t: _Payload(np.load, str(_numpy_pickle(m, t)), None, True), "numpy.load"),
    "numpy-runstring": (lambda m, t: _Payload(np.testing._private.utils.runstring, f"open({str(m)!r}, 'w')", {}),
                        "numpy.testing._private.utils.runstring"),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payloads_hidden_in_valid_files_never_run(files, tmp_path, kind):
    marker = tmp_path / "pwned"
    make, global_name = PAYLOADS[kind]
    zipped = _malicious_zip(files, tmp_path, make(marker, tmp_path))
    bare = tmp_path / "bare.pt"  # the same payload in a protocol-4 pickle that is no zip archive
    bare.write_bytes(pickle.dumps({"model": None, "opt": {"hyp": make(marker, tmp_path)}}, protocol=4))
    for path in (zipped, bare):
        for reader in (load_model, load_checkpoint, read_official):
            with pytest.raises(UserError, match="refused to load") as info:
                reader(path)
            assert global_name in str(info.value)
        with pytest.raises(SystemExit):
            checkpoint_main(["convert", str(path), str(tmp_path / "out.pt")])
    assert not marker.exists()


def test_only_the_allowlisted_classes_become_stand_ins():
    """The allowlist is the FACTS list plus what c/e models add, nothing else from models.*."""
    official = {g for g in S_GLOBALS if g.startswith(("models.", "torch.nn."))} | C_E_BLOCKS | {
        "models.yolo.DDetect", "models.yolo.Detect"}
    assert set(MODULE_CLASSES) == official


# ------------------------------------------------------------------------------ entry points
def _detecting(model: fx.DetectionModel) -> fx.DetectionModel:
    """Head output layers of an untrained model set so that every anchor predicts a box of about two
    cells with scores near 0.5: validation then has detections that can match objects."""
    for box, cls in model.model[-1].branches():
        with torch.no_grad():
            for seq in box:
                seq[-1].weight.mul_(0.01)
                seq[-1].bias.zero_()
                seq[-1].bias.view(4, fx.REG_MAX)[:, 1] = 8.0  # DFL: every side about one cell
            for seq in cls:
                seq[-1].weight.mul_(0.01)
                seq[-1].bias.zero_()
    return model


def test_convert_once_then_val_gives_the_same_map(tmp_path, synthetic):
    import val
    from utils.data.synthetic import CLASS_NAMES

    model = _detecting(fx.build("yolov9-t", len(CLASS_NAMES), seed=5))
    official = fx.write_stripped(tmp_path / "yolov9-t.pt", model, list(CLASS_NAMES))
    ours = checkpoint_main(["convert", str(official.path), str(tmp_path / "yolov9-t-ours.pt")])
    raw = torch.load(ours, map_location="cpu", weights_only=True)  # plain data: no unpickler needed
    assert raw["names"] == list(CLASS_NAMES) and raw["extra"]["official_branch"] == "model"
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in official.state_dict.items())
    metrics = [val.run(val.ValOptions(weights=str(w), data=synthetic, imgsz=IMG, batch_size=4, workers=0,
                                      device="cpu", noplots=True, project=str(tmp_path / "val"), name=w.stem))
               for w in (official.path, ours)]
    for key in ("map", "map50", "precision", "recall"):
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[0]["per_class"] == metrics[1]["per_class"]
    assert metrics[0]["map50"] > 0  # detections that match, not two empty results
    with pytest.raises(SystemExit):  # converting ours again is refused
        checkpoint_main(["convert", str(ours), str(tmp_path / "again.pt")])


def test_convert_command_line(files, tmp_path):
    """``python -m utils.checkpoint convert`` as README gives it."""
    src = files.get("gelan-t", "stripped").path
    dst = tmp_path / "gelan-t-ours.pt"
    done = subprocess.run([sys.executable, "-m", "utils.checkpoint", "convert", str(src), str(dst)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stderr and load_checkpoint(dst)["nc"] == NC


def test_export_detect_and_prune_take_an_official_file(files, tmp_path, synthetic):
    import onnxruntime as ort

    import detect_dual
    import export
    from utils.export.prune import prune_weights

    official = files.get("yolov9-t", "stripped")
    onnx_path = export.main(["--weights", str(official.path), "--include", "onnx", "--img", str(IMG),
                             "--device", "cpu"])[0]
    x = torch.rand(1, 3, IMG, IMG)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = official.graph.eval()(x)[0][1]  # the main branch of the official graph
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-2)

    images = Path(synthetic).parent / "images" / "val"
    detect_dual.main(["--weights", str(official.path), "--source", str(images), "--img", str(IMG), "--device",
                      "cpu", "--project", str(tmp_path / "detect"), "--name", "exp", "--nosave"])
    pruned, summary = prune_weights(files.get("gelan-t", "stripped").path, tmp_path / "pruned.pt", ratio=0.25,
                                    img_size=IMG)
    assert summary.params_after < summary.params_before and load_model(pruned).nc == NC

    # train.py / train_distill.py --weights: fine-tuning an official file on data with other classes
    from utils.engine.args import option_defaults
    from utils.engine.setup import build_model
    opt = argparse.Namespace(**{**option_defaults(), "cfg": "", "weights": str(official.path)})
    model = build_model(opt, nc=7, names=[str(i) for i in range(7)])
    transferred = model.state_dict()
    head = f"model.{len(model.model) - 1}."
    assert model.nc == 7 and model.training
    assert all(torch.equal(transferred[k], v.float()) for k, v in official.state_dict.items()
               if not k.startswith(head))  # backbone and neck come from the file, the head is new


def test_dual_teacher_distils_through_its_main_branch(files):
    from utils.engine.setup import load_teacher

    official = files.get("yolov9-s", "stripped")
    teacher = load_teacher(str(official.path), NAMES, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        maps = branch_maps(teacher(x))
        _, (aux, main) = official.graph.eval()(x)
    assert len(maps) == 2  # the distillation reads branch_maps(...)[-1]: the main branch
    for ours, theirs in zip(maps[-1], main):
        torch.testing.assert_close(ours, theirs, **CLOSE)
    assert not torch.allclose(maps[-1][0], aux[0])


def _bccd_subset(root: Path, out: Path, count: int = 8) -> Path:
    """A few BCCD images as a YOLO data set (labels written here from the VOC XML)."""
    xmls = sorted((root / "Annotations").glob("*.xml"))[:count]
    for index, xml in enumerate(xmls):
        split = "val" if index % 4 == 3 else "train"
        tree = ET.parse(xml).getroot()
        width, height = (float(tree.find(f"size/{k}").text) for k in ("width", "height"))
        rows = []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            x1, y1, x2, y2 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x2 > x1 and y2 > y1:
                rows.append(f"{NAMES.index(obj.find('name').text)} {(x1 + x2) / 2 / width:.6f} "
                            f"{(y1 + y2) / 2 / height:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
        image = root / "JPEGImages" / f"{xml.stem}.jpg"
        for kind, name, content in (("images", image.name, None), ("labels", f"{xml.stem}.txt", "\n".join(rows))):
            target = out / kind / split / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                target.symlink_to(image)
            else:
                target.write_text(content + "\n")
    data = out / "data.yaml"
    data.write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnc: {NC}\nnames: {NAMES}\n")
    return data


@pytest.mark.slow
def test_train_distill_with_an_official_yolov9_s_teacher(files, tmp_path, bccd_root):
    import train_distill

    teacher = files.get("yolov9-s", "stripped").path
    data = _bccd_subset(bccd_root, tmp_path / "bccd")
    train_distill.main(["--cfg", str(ROOT / "models" / "detect" / "yolov9-tiny.yaml"), "--weights", "",
                        "--teacher", str(teacher), "--data", str(data), "--epochs", "1", "--img", str(IMG),
                        "--batch", "2", "--workers", "0", "--device", "cpu", "--max-batches", "2",
                        "--project", str(tmp_path / "runs"), "--name", "official", "--noplots"])
    last = load_checkpoint(tmp_path / "runs" / "official" / "weights" / "last.pt")
    assert last["extra"]["teacher"]["path"] == str(teacher)
    assert (tmp_path / "runs" / "official" / "results.csv").is_file()

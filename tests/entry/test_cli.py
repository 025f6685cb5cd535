"""The command-line habits YOLOv9 users bring: --hyp NAME, --local-rank, --include onnx_end2end, a bare
--nms, --cache disk, detect_dual.py without --source, defaults in --help, no silent default --data, and
data/coco.yaml."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import detect_dual
import export
import prune
import train
import train_distill
import val
from models.yolo import DetectionModel
from utils.checkpoint.ours import make_checkpoint, save_checkpoint
from utils.core.device import dist_info
from utils.core.errors import UserError
from utils.data.config import _find_yaml, _parse_names, load_data_config
from utils.data.sources import resolve_source
from utils.engine.args import apply_local_rank, build_parser
from utils.engine.setup import load_hyp
from utils.export.onnx import read_metadata

from tests.helpers import train_argv

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"train.py": train, "train_distill.py": train_distill, "val.py": val, "detect_dual.py": detect_dual,
                "export.py": export, "prune.py": prune}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    model = DetectionModel("yolov9-tiny", nc=3)
    model.names = ["RBC", "WBC", "Platelets"]
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(make_checkpoint(model, half=False), path)
    return path


# ------------------------------------------------------------------------------------------ --help
def _parser_of(module, monkeypatch) -> argparse.ArgumentParser:
    """The parser an entry point builds, caught on its way through ``--help``."""
    seen = []
    original = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", spy)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", original)
    assert exit_info.value.code == 0
    return seen[0]


@pytest.mark.parametrize("script", list(ENTRY_POINTS))
def test_help_shows_every_default(script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one line per help text: no wrapping inside "(default: ...)"
    parser = _parser_of(ENTRY_POINTS[script], monkeypatch)
    capsys.readouterr()
    blocks: dict[str, str] = {}
    key = None
    for line in parser.format_help().splitlines():
        if re.match(r"^  -", line):
            key = line.split()[0].rstrip(",")
            blocks[key] = line
        elif key is not None and line.startswith("   "):
            blocks[key] += " " + line.strip()
    checked = 0
    for action in parser._actions:
        if (not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS
                or action.default is None):
            continue
        shown = "''" if action.default == "" else str(action.default)
        assert f"(default: {shown})" in blocks[action.option_strings[0]], (script, action.option_strings[0])
        checked += 1
    assert checked >= 5


# ------------------------------------------------------------------------------ --data and --hyp
@pytest.mark.parametrize("main, extra", [(train.main, []), (train_distill.main, ["--teacher", "t.pt"])])
def test_no_data_is_an_error_naming_the_flag(main, extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--cfg", "models/detect/yolov9-tiny.yaml", "--device", "cpu", *extra])
    assert exit_info.value.code == 2
    line = _one_line(capsys)
    assert line.startswith("error: --data is required") and "--data synthetic" in line


def test_synthetic_on_purpose_and_resume_need_no_yaml_path():
    for value in ("synthetic", "synthetic.yaml"):
        opt = build_parser().parse_args(["--data", value])
        assert _find_yaml(opt.data) == ROOT / "data" / "synthetic.yaml"
    assert build_parser(distill=True).parse_args(["--resume", "runs/x/weights/last.pt"]).data is None


def test_hyp_name_is_looked_up_in_hyp(tmp_path, monkeypatch, capsys):
    hyp_dir = ROOT / "hyp"
    for distill, value, file in ((False, "hyp.scratch-low.yaml", "hyp.scratch-low.yaml"),
                                 (False, "hyp.scratch-high", "hyp.scratch-high.yaml"),
                                 (True, "hyp.distill-classic.yaml", "hyp.distill-classic.yaml")):
        opt = build_parser(distill).parse_args(["--data", "synthetic", "--hyp", value])
        assert Path(opt.hyp) == hyp_dir / file
        assert load_hyp(opt.hyp) == load_hyp(hyp_dir / file)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hyp.scratch-low.yaml").write_text("lr0: 0.5\n")  # a file where the user is comes first
    assert load_hyp(build_parser().parse_args(["--data", "synthetic", "--hyp", "hyp.scratch-low.yaml"]).hyp) == \
        {"lr0": 0.5}
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "synthetic", "--hyp", "hyp.nope.yaml"])
    assert exit_info.value.code == 2
    line = _one_line(capsys)
    assert "--hyp" in line and "hyp.nope.yaml" in line and str(hyp_dir) in line


def test_yolov9_hyp_keys_of_anchor_based_heads_are_accepted(tmp_path):
    """obj, obj_pw, iou_t and anchor_t mean nothing to the anchor-free head, but a YOLOv9 user's hyp file
    has them: they load, and neither the loss nor the distillation settings refuse them."""
    from utils.distill import DistillConfig
    from utils.loss import DetectionLoss

    yolov9_only = {"obj": 0.7, "obj_pw": 1.0, "iou_t": 0.2, "anchor_t": 5.0}
    hyp_file = tmp_path / "hyp.yolov9.yaml"
    hyp_file.write_text(yaml.safe_dump({**load_hyp(ROOT / "hyp" / "hyp.distill.yaml"), **yolov9_only}))
    hyp = load_hyp(hyp_file)
    assert {key: hyp[key] for key in yolov9_only} == yolov9_only
    DistillConfig.from_hyp(hyp)
    DetectionLoss(DetectionModel("gelan-t.yaml", nc=2), hyp)


# ------------------------------------------------------------------------------------------ --cache
def test_cache_ram_bare_and_disk_refused(capsys):
    assert build_parser().parse_args(["--data", "synthetic", "--cache"]).cache == "ram"
    assert build_parser().parse_args(["--data", "synthetic"]).cache is None
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "synthetic", "--cache", "disk"])
    assert exit_info.value.code == 2
    line = _one_line(capsys)
    assert "--cache disk" in line and "--cache ram" in line


# ------------------------------------------------------------------------------------- --local-rank
def test_local_rank_flag_acts_as_torchrun_env(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    monkeypatch.setattr(os, "environ", env)
    for argv in (["--local-rank=1"], ["--local_rank", "1"]):
        env.pop("LOCAL_RANK", None)
        opt = build_parser().parse_args(["--data", "synthetic", *argv])
        apply_local_rank(opt)
        assert env["LOCAL_RANK"] == "1" and dist_info().local_rank == 1
    env.pop("LOCAL_RANK")
    apply_local_rank(build_parser().parse_args(["--data", "synthetic"]))  # not given: nothing set
    assert "LOCAL_RANK" not in env and dist_info().local_rank == -1
    env["LOCAL_RANK"] = "0"
    with pytest.raises(UserError, match="LOCAL_RANK=0"):
        apply_local_rank(build_parser(distill=True).parse_args(["--data", "synthetic", "--local-rank", "1"]))


@pytest.mark.slow
def test_torch_distributed_launch_runs_train(tiny_data, tmp_path):
    """``python -m torch.distributed.launch`` passes ``--local-rank=0`` to the script (one process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port", "29563",
           str(ROOT / "train.py"), *train_argv(tiny_data, tmp_path, "launch", epochs=1)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "launch" / "weights" / "best.pt").is_file()


# ------------------------------------------------------------------------------------------ export
def test_export_yolov9_spellings_of_end2end():
    def parse(*argv):
        return export.parse_args(["--weights", "w.pt", *argv])

    for argv in (("--include", "onnx_end2end"), ("--nms",), ("--end2end",), ("--include", "onnx", "--nms")):
        opt = parse(*argv)
        assert opt.include == ["onnx"] and opt.end2end and opt.nms == "trt", argv
    opt = parse("--include", "onnx_end2end", "engine", "--nms", "ort")
    assert opt.include == ["onnx", "engine"] and opt.end2end and opt.nms == "ort"
    opt = parse()
    assert not opt.end2end and opt.include == ["onnx"]


def test_export_onnx_end2end_writes_nms_graph(tiny_weights, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(tiny_weights.read_bytes())
    [path] = export.main(["--weights", str(weights), "--include", "onnx_end2end", "--img", "64", "--device", "cpu"])
    assert read_metadata(path)["layout"] == "end2end-trt"


# ------------------------------------------------------------------------------------- detect_dual
def test_detect_default_source_is_bundled(tiny_weights, tmp_path):
    source = detect_dual.parse_args(["--weights", "w.pt"]).source
    images = resolve_source(source)
    assert Path(source) == ROOT / "data" / "images" and 3 <= len(images) <= 4
    assert all(Path(p).suffix == ".jpg" and (ROOT / "data" / "bccd" / "JPEGImages" / Path(p).name).read_bytes()
               == Path(p).read_bytes() for p in images)  # unchanged copies of bundled BCCD images
    save_dir = detect_dual.main(["--weights", str(tiny_weights), "--img", "64", "--device", "cpu",
                                 "--project", str(tmp_path), "--name", "default"])
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == sorted(Path(p).name for p in images)


# ------------------------------------------------------------------------------------- data/coco.yaml
def test_coco_yaml_has_yolov9_layout():
    file = ROOT / "data" / "coco.yaml"
    data = yaml.safe_load(file.read_text())
    assert data["path"] == "../datasets/coco"
    assert (data["train"], data["val"], data["test"]) == ("train2017.txt", "val2017.txt", "test-dev2017.txt")
    nc, names = _parse_names(file, data)
    assert nc == 80 and len(set(names)) == 80 and names[0] == "person" and names[79] == "toothbrush"
    with pytest.raises(UserError, match="datasets/coco"):  # found by name; the set itself is the user's
        load_data_config("coco.yaml")

"""val.py, detect_dual.py, utils/eval/evaluator.py, utils/export/backends.py and utils/data/sources.py end to end
(CPU, tiny)."""

import cv2
import numpy as np
import pytest
import torch

import detect_dual
import val
from utils.core.errors import UserError
from utils.data.augment import letterbox
from utils.data.sources import open_source
from utils.eval.evaluator import evaluate
from utils.export.backends import load_backend
from utils.ops.boxes import scale_boxes

IMG = 64
CLASS_NAMES = ["circle", "ring", "triangle", "square", "star", "cross", "hexagon"]  # the synthetic set's
METRIC_KEYS = {"precision", "recall", "map50", "map", "per_class", "speed_ms", "loss", "fitness"}


@pytest.fixture(scope="module")
def tiny_model():
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("models/detect/gelan-t.yaml", nc=len(CLASS_NAMES))
    model.names = list(CLASS_NAMES)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    from utils.checkpoint.ours import make_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(make_checkpoint(tiny_model, half=False), path)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from utils.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n_train=1, n_val=5, img_size=IMG)


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (333, 517), (100, 1000), (64, 64)])
@pytest.mark.parametrize("auto", [False, True])
def test_letterbox_then_scale_boxes_recovers_boxes(shape, auto):
    h0, w0 = shape
    boxes = np.array([[0.0, 0.0, w0, h0], [0.1 * w0, 0.2 * h0, 0.55 * w0, 0.9 * h0], [w0 / 3, h0 / 7, w0 / 2, h0 / 2]])
    img, (rw, rh), (pw, ph) = letterbox(np.zeros((h0, w0, 3), np.uint8), 256, auto=auto, stride=32)
    net = boxes * np.array([rw, rh, rw, rh]) + np.array([pw, ph, pw, ph])
    assert net[:, [0, 2]].max() <= img.shape[1] + 1e-6 and net[:, [1, 3]].max() <= img.shape[0] + 1e-6
    back = scale_boxes(img.shape[:2], torch.tensor(net), (h0, w0), ((rw, rh), (pw, ph)))
    assert np.abs(back.numpy() - boxes).max() < 1e-3


def test_val_runs_and_returns_metrics(checkpoint, synthetic, tmp_path):
    metrics = val.run(val.ValOptions(weights=str(checkpoint), data=str(synthetic), imgsz=IMG, batch_size=3,
                                     workers=0, project=str(tmp_path), name="v", save_json=True, save_txt=True,
                                     conf_thres=0.001))
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["images"] == 5 and metrics["instances"] > 0
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("precision", "recall", "map50", "map"))
    assert set(metrics["speed_ms"]) == {"preprocess", "inference", "nms"}
    assert {c["name"] for c in metrics["per_class"]} <= set(CLASS_NAMES)
    save_dir = tmp_path / "v"
    for name in ("ground_truth.json", "predictions.json", "PR_curve.png", "confusion_matrix.png",
                 "val_batch0_labels.jpg", "val_batch0_pred.jpg", "metrics.json"):
        assert (save_dir / name).is_file(), name
    assert len(list((save_dir / "labels").glob("*.txt"))) == 5
    assert metrics["coco"]["map"] == pytest.approx(metrics["map"], abs=0.01)


def test_cli_errors_are_one_line_and_exit_2(checkpoint, synthetic, capsys, monkeypatch):
    # a log handler bound to this test's captured stderr would outlive it
    monkeypatch.setattr(val, "setup_logging", lambda: None)
    monkeypatch.setattr(detect_dual, "setup_logging", lambda: None)
    cases = [(val.main, ["--weights", "missing.pt", "--data", str(synthetic)]),
             (val.main, ["--weights", str(checkpoint), "--bogus"]),
             (val.main, ["--weights", str(checkpoint), "--data", str(synthetic), "--conf-thres", "2"]),
             (detect_dual.main, ["--weights", str(checkpoint), "--source", "no/such/folder"]),
             (detect_dual.main, ["--weights", str(checkpoint), "--img", "x"])]
    for main, argv in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err


def test_detect_folder_with_corrupt_image(checkpoint, synthetic, tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    images = sorted((synthetic.parent / "images" / "val").glob("*.jpg"))[:2]
    tall = cv2.resize(cv2.imread(str(images[0])), (40, 90))  # another aspect ratio
    cv2.imwrite(str(src / "a.jpg"), cv2.imread(str(images[1])))
    cv2.imwrite(str(src / "tall.png"), tall)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    save_dir = detect_dual.run(detect_dual.DetectOptions(weights=str(checkpoint), source=str(src), imgsz=IMG,
                                                         conf_thres=0.0, max_det=5, project=str(tmp_path / "runs"),
                                                         save_txt=True, save_conf=True, save_crop=True))
    assert save_dir.name == "exp"
    assert sorted(p.name for p in save_dir.glob("*.*")) == ["a.jpg", "tall.png"]
    assert cv2.imread(str(save_dir / "tall.png")).shape == (90, 40, 3)  # written at the original size
    rows = np.loadtxt(save_dir / "labels" / "tall.txt", ndmin=2)
    assert 1 <= rows.shape[0] <= 5 and rows.shape[1] == 6 and rows[:, 1:5].min() >= 0 and rows[:, 1:5].max() <= 1
    assert any((save_dir / "crops").rglob("*.jpg"))
    assert "broken.jpg" in caplog.text
    again = detect_dual.run(detect_dual.DetectOptions(weights=str(checkpoint), source=str(src / "a.jpg"), imgsz=IMG,
                                                      project=str(tmp_path / "runs"), nosave=True))
    assert again.name == "exp2"


def test_sources_list_glob_video(tmp_path):
    frame = np.full((48, 64, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "one.jpg"), frame)
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    (tmp_path / "list.txt").write_text("one.jpg\nclip.avi\n")
    frames = list(open_source(tmp_path / "list.txt"))
    assert [(f.kind, f.index) for f in frames] == [("image", 0), ("video", 0), ("video", 1), ("video", 2)]
    assert frames[1].image.shape == (48, 64, 3)
    assert [f.kind for f in open_source(str(tmp_path / "*.jpg"))] == ["image"]
    with pytest.raises(UserError):
        open_source(tmp_path / "missing.jpg")
    with pytest.raises(UserError):
        open_source(str(tmp_path / "*.png"))


def test_onnx_backend_matches_pt(checkpoint, tmp_path):
    from utils.export.model import prepare_model
    from utils.export.onnx import export_onnx

    model = prepare_model(str(checkpoint), torch.device("cpu"), half=False)
    onnx_path = export_onnx(model, tmp_path / "tiny.onnx", IMG, names=CLASS_NAMES, stride=32)
    pt, ort = load_backend(checkpoint, "cpu"), load_backend(onnx_path, "cpu")
    assert ort.names == CLASS_NAMES and ort.img_size == (IMG, IMG) and ort.stride == 32
    x = torch.rand(2, 3, IMG, IMG)  # batch 2 through a batch-1 export: the backend splits it
    y_pt, y_ort = pt(x), ort(x)
    assert y_ort.shape == y_pt.shape == (2, 4 + len(CLASS_NAMES), 84)
    assert torch.allclose(y_pt, y_ort, atol=1e-3)


def test_evaluate_restores_training_mode_and_averages_loss(tiny_model):
    imgs = torch.randint(0, 255, (2, 3, IMG, IMG), dtype=torch.uint8)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 2, 0.4, 0.4, 0.2, 0.5]])
    shapes = [((IMG, IMG), ((1.0, 1.0), (0.0, 0.0)))] * 2
    batches = [(imgs, targets, ["a.jpg", "b.jpg"], shapes)] * 2
    seen_maps = []

    def fake_loss(maps, tg):
        seen_maps.append(len(maps))
        return torch.tensor(0.0), torch.tensor([1.0, 2.0, 3.0])

    tiny_model.train()
    metrics = evaluate(tiny_model, batches, CLASS_NAMES, compute_loss=fake_loss, progress=False)
    assert tiny_model.training
    assert metrics["loss"] == pytest.approx([1.0, 2.0, 3.0]) and seen_maps == [3, 3]
    assert metrics["images"] == 4 and metrics["instances"] == 4
    tiny_model.eval()

    import yaml

    from utils.loss import DetectionLoss

    hyp = yaml.safe_load(open("hyp/hyp.scratch-high.yaml"))
    metrics = evaluate(tiny_model, batches[:1], CLASS_NAMES, compute_loss=DetectionLoss(tiny_model, hyp),
                       progress=False)
    assert len(metrics["loss"]) == 3 and all(np.isfinite(metrics["loss"])) and metrics["loss"][1] > 0
    assert not tiny_model.training

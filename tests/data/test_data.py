"""data.yaml, the label checks and cache, the loader contract, and the synthetic set."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from utils.core import atomic
from utils.core.errors import UserError
from utils.data import labels, synthetic
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, close_mosaic, create_dataloader
from utils.ops.boxes import scale_boxes, xywhn2xyxy

ROOT = Path(__file__).resolve().parents[2]
RGB = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)], np.uint8)
NO_AUG = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                           "perspective", "flipud", "fliplr", "mosaic", "mixup", "erasing")}


def write_image(path: Path, img_rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(img_rgb[:, :, ::-1]))


def painted_set(root: Path, split: str = "train", specs=None) -> Path:
    """Images (PNG, black) with one filled rectangle per class colour and exact YOLO labels.

    ``specs``: per image (height, width, [(class, x1, y1, x2, y2) pixels]).
    """
    specs = specs or [(96, 128, [(0, 10, 12, 50, 40), (1, 70, 50, 120, 90)]),
                      (128, 96, [(2, 8, 8, 60, 50), (3, 20, 70, 80, 120)]),
                      (80, 80, [(4, 30, 30, 70, 70)]),
                      (112, 144, [(5, 4, 60, 40, 100), (0, 90, 10, 140, 40)])]
    for k, (h, w, boxes) in enumerate(specs):
        img = np.zeros((h, w, 3), np.uint8)
        rows = []
        for cls, x1, y1, x2, y2 in boxes:
            img[y1:y2, x1:x2] = RGB[cls]
            rows.append(f"{cls} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
        write_image(root / "images" / split / f"im{k}.png", img)
        label = root / "labels" / split / f"im{k}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(rows))
    return root / "images" / split


def class_pixels_box(img_hwc: np.ndarray, cls: int, window) -> tuple | None:
    """Bounding box of the pixels at least half covered by ``cls``'s colour inside ``window``."""
    x1, y1, x2, y2 = (int(round(v)) for v in window)
    h, w = img_hwc.shape[:2]
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    crop = img_hwc[y1:y2, x1:x2].astype(float)
    color = RGB[cls].astype(float)
    alpha = crop @ color / (color @ color)
    near = (alpha >= 0.5) & (np.abs(crop - alpha[..., None] * color).max(-1) < 40)
    ys, xs = np.nonzero(near)
    if not len(xs):
        return None
    return xs.min() + x1, ys.min() + y1, xs.max() + 1 + x1, ys.max() + 1 + y1


def assert_targets_on_pixels(imgs: torch.Tensor, targets: torch.Tensor, slack: float = 3.0) -> None:
    """Each target box sits tightly on the pixels of its class colour (RGB batch)."""
    height, width = imgs.shape[2:]
    assert len(targets)
    for idx, cls, cx, cy, w, h in targets.tolist():
        box = xywhn2xyxy(np.array([cx, cy, w, h]), width, height)
        img = imgs[int(idx)].permute(1, 2, 0).numpy()
        found = class_pixels_box(img, int(cls), (box[0] - slack, box[1] - slack, box[2] + slack, box[3] + slack))
        assert found is not None, f"no pixels of class {cls} under its box"
        assert np.abs(np.subtract(found, box)).max() <= 1.5, (cls, found, box)


# ---------------------------------------------------------------- data.yaml


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_data_yaml_resolution(tmp_path, monkeypatch):
    painted_set(tmp_path / "ds", "train")
    painted_set(tmp_path / "ds", "val")
    (tmp_path / "ds" / "val.txt").write_text("images/val/im0.png\n./images/val/im1.png\n")
    (tmp_path / "cfg" / "extra").mkdir(parents=True)
    cfg = write_yaml(tmp_path / "cfg" / "data.yaml", {
        "path": "../ds", "train": ["images/train", "extra"], "val": "val.txt",
        "names": {0: "a", 1: "b", 2: "c", 3: "d", 4: "e", 5: "f"}})
    data = load_data_config(cfg)
    assert data["path"] == str((tmp_path / "ds").resolve())
    # 'extra' is not under path: it resolves against the yaml's folder.
    assert data["train"] == [str(tmp_path / "ds" / "images" / "train"), str(tmp_path / "cfg" / "extra")]
    assert data["val"] == str(tmp_path / "ds" / "val.txt")
    assert data["test"] is None and data["nc"] == 6 and data["names"][5] == "f"
    assert data["yaml_file"] == str(cfg)

    # A relative 'path' that is not next to the yaml resolves against the current directory.
    monkeypatch.chdir(tmp_path)
    other = write_yaml(tmp_path / "elsewhere" / "d.yaml", {"path": "ds", "train": "images/train", "nc": 6})
    data = load_data_config(other)
    assert data["train"] == str(tmp_path / "ds" / "images" / "train") and data["names"][0] == "class0"
    loader, dataset = create_dataloader(load_data_config(cfg)["val"], LoaderOptions(64, 2, workers=0))
    assert len(dataset) == 2


@pytest.mark.parametrize("content,message", [
    ({"path": ".", "train": "images/train", "nc": 3, "names": ["a", "b"]}, "nc is 3 but 'names' lists 2"),
    ({"path": ".", "train": "nowhere", "names": ["a"]}, "train path 'nowhere' not found"),
    ({"path": "missing_root", "train": "images/train", "names": ["a"]}, "data set folder"),
    ({"path": ".", "train": "images/train", "names": {0: "a", 2: "b"}}, "without gaps"),
    ({"path": ".", "train": "images/train"}, "give the classes"),
    ({"path": ".", "test": "images/train", "names": ["a"]}, "no 'train' or 'val'"),
    ({"path": ".", "train": "images/train", "nc": "three", "names": ["a"]}, "positive integer"),
])
def test_data_yaml_errors(tmp_path, content, message):
    painted_set(tmp_path)
    cfg = write_yaml(tmp_path / "data.yaml", content)
    with pytest.raises(UserError, match=message):
        load_data_config(cfg)


def test_data_yaml_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_data_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_data_config(listed)


def test_shipped_yaml_files_agree_with_their_data():
    syn = yaml.safe_load((ROOT / "data" / "synthetic.yaml").read_text())
    assert syn["names"] == list(synthetic.CLASS_NAMES) and syn["nc"] == len(synthetic.CLASS_NAMES)
    bccd = yaml.safe_load((ROOT / "data" / "bccd.yaml").read_text())
    assert bccd["names"] == ["RBC", "WBC", "Platelets"] and bccd["nc"] == 3


# ---------------------------------------------------------------- synthetic set


def test_synthetic_is_deterministic_and_valid(tmp_path):
    a = synthetic.generate(tmp_path / "a", n_train=3, n_val=2, img_size=96, seed=5)
    b = synthetic.generate(tmp_path / "b", n_train=3, n_val=2, img_size=96, seed=5)
    c = synthetic.generate(tmp_path / "c", n_train=3, n_val=2, img_size=96, seed=6)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert len(files) == 2 * 5 + 1
    for rel in files:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    assert (a.parent / "images/train/00000.jpg").read_bytes() != (c.parent / "images/train/00000.jpg").read_bytes()
    data = load_data_config(a)
    assert data["nc"] == len(synthetic.CLASS_NAMES)
    labels = np.concatenate([np.loadtxt(p, ndmin=2).reshape(-1, 5) for p in (a.parent / "labels").rglob("*.txt")])
    assert len(labels) >= 5
    assert labels[:, 0].min() >= 0 and labels[:, 0].max() < len(synthetic.CLASS_NAMES)
    assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 1).all()
    assert (labels[:, 3:] * 96 >= synthetic.MIN_OBJECT_PX / 2).all()


def test_synthetic_generated_on_first_use_then_reused(tmp_path, log_lines):
    cfg = write_yaml(tmp_path / "syn.yaml", {
        "path": "gen", "train": "images/train", "val": "images/val", "names": list(synthetic.CLASS_NAMES),
        "synthetic": {"n_train": 2, "n_val": 1, "img_size": 64, "seed": 1}})
    data = load_data_config(cfg)
    first = Path(data["train"]) / "00000.jpg"
    assert first.is_file() and data["path"] == str(tmp_path / "gen")
    mtime = first.stat().st_mtime_ns
    assert any("generating the synthetic data set" in line for line in log_lines)
    log_lines.clear()
    load_data_config(cfg)
    assert first.stat().st_mtime_ns == mtime and not any("generating" in line for line in log_lines)
    assert not list(tmp_path.glob(".gen.tmp-*"))


# ---------------------------------------------------------------- bad input


def test_bad_input_is_reported_once_dropped_and_counted(tmp_path, log_lines):
    src = painted_set(tmp_path)
    (src / "corrupt.jpg").write_bytes(b"not an image at all")
    good = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "trailing.jpg").write_bytes(good + b"camera trailer")  # data after the end marker is fine
    (tmp_path / "labels" / "train" / "trailing.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    write_image(src / "background.png", np.zeros((64, 64, 3), np.uint8))  # no label file
    write_image(src / "bad.png", np.zeros((100, 100, 3), np.uint8))
    bad_rows = ["0 0.5 0.5 0.2",            # 1 wrong column count
                "1 0.5 abc 0.2 0.2",        # 2 not a number
                "2 0.5 0.5 0.2 0.2",        # 3 good
                "2 0.5 0.5 0.2 0.2",        # 4 duplicate of 3
                "9 0.5 0.5 0.2 0.2",        # 5 class >= nc
                "-1 0.5 0.5 0.2 0.2",       # 6 negative class
                "0 0.5 0.5 0.0 0.2",        # 7 zero width
                "0 3.0 0.5 0.2 0.2",        # 8 nonsense coordinate
                "1 0.1 0.5 0.24 0.2",       # 9 2 px outside on the left: clipped
                "",                         # 10 empty lines are fine
                "3 0.1 0.1 0.3 0.1 0.2 0.4"]  # 11 a polygon (segment) row: its bounding box
    (tmp_path / "labels" / "train" / "bad.txt").write_text("\n".join(bad_rows))
    loader, dataset = create_dataloader(str(src), LoaderOptions(64, 4, workers=0, nc=6, prefix="train: "))
    label_file = str(tmp_path / "labels" / "train" / "bad.txt")
    expect = {1: "malformed", 2: "malformed", 4: "duplicate of line 3", 5: "class 9 out of range",
              6: "class -1 out of range", 7: "degenerate", 8: "outside the image", 9: "clipped"}
    for line_no, what in expect.items():
        hits = [m for m in log_lines if m.startswith(f"train: {label_file}:{line_no}:")]
        assert len(hits) == 1 and what in hits[0], (line_no, hits)
    for name, what in (("corrupt.jpg", "not an image file"), ("truncated.jpg", "truncated JPEG")):
        hits = [m for m in log_lines if f"{name}:" in m]
        assert len(hits) == 1 and what in hits[0] and hits[0].endswith("skipped")
    summary = [m for m in log_lines if m.startswith("train: 7 images")]
    assert summary == ["train: 7 images, 2 corrupt skipped, 7 labels dropped (2 malformed, 1 out of range, "
                       "2 bad class, 1 degenerate, 1 duplicate), 1 boxes clipped, 1 backgrounds "
                       "(1 without label file)"]
    bad = dataset.labels[dataset.im_files.index(str(src / "bad.png"))]
    assert bad.shape == (3, 5) and bad[1, 1] - bad[1, 3] / 2 == pytest.approx(0.0, abs=1e-6)
    assert np.allclose(bad[2], [3, 0.2, 0.25, 0.2, 0.3])
    batches = list(loader)  # the run goes on
    assert sum(b[0].shape[0] for b in batches) == 7


def test_no_usable_image_is_a_user_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable image"):
        create_dataloader(str(tmp_path / "images"), LoaderOptions(64, 2, workers=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        create_dataloader(str(tmp_path / "empty"), LoaderOptions(64, 2, workers=0))


# ---------------------------------------------------------------- label cache


def test_label_cache_reused_and_invalidated(tmp_path, log_lines):
    src = painted_set(tmp_path)
    (tmp_path / "labels" / "train" / "im2.txt").write_text("4 0.5 0.5 0.5 0.5\n7 0.5 0.5 0.1 0.1\n")
    create_dataloader(str(src), LoaderOptions(64, 2, workers=0, nc=6, prefix="t: "))
    cache = tmp_path / "labels" / "train.cache"
    assert cache.is_file()
    first_lines = list(log_lines)
    log_lines.clear()
    _, dataset = create_dataloader(str(src), LoaderOptions(64, 2, workers=0, nc=6, prefix="t: "))
    assert any(line.endswith("(from cache)") for line in log_lines)
    # The problems are reported again from the cache, once each.
    assert [m for m in log_lines if "class 7" in m] == [m for m in first_lines if "class 7" in m]
    assert len(dataset.labels[2]) == 1

    label = tmp_path / "labels" / "train" / "im2.txt"
    label.write_text("4 0.5 0.5 0.5 0.5\n4 0.2 0.2 0.1 0.1\n")
    os.utime(label, ns=(label.stat().st_mtime_ns + 10**9,) * 2)
    log_lines.clear()
    _, dataset = create_dataloader(str(src), LoaderOptions(64, 2, workers=0, nc=6, prefix="t: "))
    assert not any("(from cache)" in line for line in log_lines)
    assert len(dataset.labels[2]) == 2
    # A different nc changes which labels are valid: the cache must not be reused.
    log_lines.clear()
    create_dataloader(str(src), LoaderOptions(64, 2, workers=0, nc=4, prefix="t: "))
    assert not any("(from cache)" in line for line in log_lines)


def test_unwritable_cache_folder_only_warns(tmp_path, log_lines, monkeypatch):
    src = painted_set(tmp_path)
    label_file = labels.img2label_path(str(src / "im0.png"))
    cache = labels.cache_path_for([label_file])
    # A folder where the temporary cache file would go makes the write fail, even for root.
    blocker = cache.parent / f".{cache.name}.blocked.tmp"
    blocker.mkdir()
    monkeypatch.setattr(atomic, "temporary_name", lambda path: blocker)
    _, dataset = create_dataloader(str(src), LoaderOptions(64, 2, workers=0))
    assert len(dataset) == 4 and not cache.exists()
    assert any("label cache not written" in line for line in log_lines)


def test_img2label_path_rule():
    assert labels.img2label_path("/d/images/train/images/a.jpg") == "/d/images/train/labels/a.txt"
    assert labels.img2label_path("/d/images/train/a.b.png") == "/d/labels/train/a.b.txt"
    assert labels.img2label_path("/d/pics/a.jpg") == "/d/pics/a.txt"


# ---------------------------------------------------------------- loader


def test_batch_contract_and_rect_round_trip(tmp_path):
    src = painted_set(tmp_path)
    loader, dataset = create_dataloader(str(src), LoaderOptions(128, 2, stride=32, rect=True, workers=0, nc=6))
    assert all(len(lab) and lab.shape[1] == 5 for lab in dataset.labels)
    for imgs, targets, paths, shapes in loader:
        assert imgs.dtype == torch.uint8 and imgs.shape[1] == 3
        assert imgs.shape[2] % 32 == 0 and imgs.shape[3] % 32 == 0 and max(imgs.shape[2:]) == 128
        assert targets.dtype == torch.float32 and targets.shape[1] == 6
        assert set(targets[:, 0].long().tolist()) <= set(range(len(paths)))
        assert_targets_on_pixels(imgs, targets)
        for k, path in enumerate(paths):
            (h0, w0), ratio_pad = shapes[k]
            assert cv2.imread(path).shape[:2] == (h0, w0)
            mine = targets[targets[:, 0] == k]
            boxes = xywhn2xyxy(mine[:, 2:].clone(), imgs.shape[3], imgs.shape[2])
            back = scale_boxes(tuple(imgs.shape[2:]), boxes, (h0, w0), ratio_pad)
            original = dataset.labels[dataset.im_files.index(path)]
            expect = xywhn2xyxy(torch.from_numpy(original[:, 1:]), w0, h0)
            assert torch.allclose(back, expect, atol=0.5)


def test_augmented_batches_keep_boxes_on_pixels(tmp_path):
    src = painted_set(tmp_path)
    hyp = dict(NO_AUG, mosaic=1.0, translate=0.1, scale=0.3, fliplr=0.5, flipud=0.5)
    loader, dataset = create_dataloader(str(src), LoaderOptions(128, 4, hyp=hyp, augment=True, workers=0, shuffle=True,
                                                                seed=1))
    for _ in range(2):
        for imgs, targets, _, shapes in loader:
            assert imgs.shape[2:] == (128, 128)
            assert_targets_on_pixels(imgs, targets)
    close_mosaic(loader)
    for imgs, targets, _, shapes in loader:
        assert_targets_on_pixels(imgs, targets)


def test_seeded_loader_reproduces_batches(tmp_path):
    src = painted_set(tmp_path)
    hyp = dict(NO_AUG, mosaic=1.0, mixup=0.5, translate=0.1, scale=0.5, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4,
               fliplr=0.5, degrees=10, erasing=0.5)

    def epochs(seed, workers=0, first_epoch=None, n=2):
        loader, _ = create_dataloader(str(src), LoaderOptions(96, 2, hyp=hyp, augment=True, workers=workers,
                                                              shuffle=True, seed=seed))
        if first_epoch is not None:
            loader.sampler.set_epoch(first_epoch)
        return [[(b[0].clone(), b[1].clone(), b[2]) for b in loader] for _ in range(n)]

    def same(x, y):
        return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(x, y))

    base = epochs(3)
    assert same(base[0], epochs(3)[0])
    assert not same(base[0], base[1])  # a new epoch, new draws
    assert not same(base[0], epochs(4, n=1)[0])
    assert same(base[1], epochs(3, first_epoch=1, n=1)[0])  # a resumed run repeats epoch 1
    assert same(base[0] + base[1], sum(epochs(3, workers=1), []))  # worker processes change nothing


def test_close_mosaic_reaches_persistent_workers(tmp_path):
    # Uniform single-colour images: a mosaic shows several colours, a plain image one.
    specs = [(64, 64, [(k, 0, 0, 64, 64)]) for k in range(4)]
    src = painted_set(tmp_path, specs=specs)
    hyp = dict(NO_AUG, mosaic=1.0)
    loader, _ = create_dataloader(str(src), LoaderOptions(64, 4, hyp=hyp, augment=True, workers=1, shuffle=True))
    assert loader.persistent_workers

    def colours_per_image(batch_imgs):
        return [len(np.unique(img.reshape(3, -1).T.numpy(), axis=0)) for img in batch_imgs]

    before = [n for imgs, *_ in loader for n in colours_per_image(imgs)]
    worker_iter = loader._iterator
    close_mosaic(loader)
    after = [n for imgs, *_ in loader for n in colours_per_image(imgs)]
    assert loader._iterator is worker_iter  # the same worker processes served both epochs
    assert max(before) >= 2 and after == [1, 1, 1, 1]


def test_ram_cache_and_gpu_augment_mode(tmp_path):
    src = painted_set(tmp_path)
    plain, _ = create_dataloader(str(src), LoaderOptions(96, 4, workers=0))
    cached, dataset = create_dataloader(str(src), LoaderOptions(96, 4, workers=0, cache="ram"))
    assert all(im is not None for im in dataset.ims)
    a, b = next(iter(plain)), next(iter(cached))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # gpu_augment: augment=True but only the letterbox happens (the GPU does the rest).
    hyp = dict(NO_AUG, mosaic=1.0, hsv_v=0.9, fliplr=1.0, scale=0.5)
    gpu, gpu_set = create_dataloader(str(src), LoaderOptions(96, 4, hyp=hyp, augment=True, workers=0,
                                                             gpu_augment=True))
    c = next(iter(gpu))
    assert not gpu_set.mosaic
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    # Augmenting from the read-only RAM cache never writes into it, with or without mosaic.
    for mosaic in (0.0, 1.0):
        hyp = dict(NO_AUG, mosaic=mosaic, hsv_v=0.9, fliplr=1.0, erasing=1.0, translate=0.1)
        aug_loader, aug_set = create_dataloader(str(src), LoaderOptions(96, 4, hyp=hyp, augment=True, workers=0,
                                                                        cache="ram"))
        before = [im.copy() for im in aug_set.ims]
        next(iter(aug_loader))
        assert all(np.array_equal(x, y) for x, y in zip(before, aug_set.ims))
    with pytest.raises(UserError, match="--cache"):
        create_dataloader(str(src), LoaderOptions(96, 4, workers=0, cache="disk"))

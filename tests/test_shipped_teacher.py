"""The teachers shipped in weights/ (gelan-t, gelan-s at 80 and at 160 epochs, trained on the bundled BCCD by the commands in README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.checkpoint import load_checkpoint, load_model
from utils.data_config import load_data_config
from utils.datasets import create_dataloader
from utils.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
IMG = 256
# what training reported for each best.pt (README); fused fp32 on the CPU gives the same
VAL_MAP = {"gelan-t-bccd256.pt": 0.5086, "gelan-s-bccd256.pt": 0.5547, "gelan-s-bccd256-e160.pt": 0.5909}
TOLERANCE = 0.005


@pytest.mark.parametrize("name", sorted(VAL_MAP))
def test_shipped_teacher_loads_and_scores_what_readme_says(name):
    teacher = ROOT / "weights" / name
    ckpt = load_checkpoint(teacher)
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None  # released: EMA weights, no training state
    model = load_model(teacher, fuse=True)
    assert model.nc == 3 and list(model.names) == ["RBC", "WBC", "Platelets"]
    assert [int(s) for s in model.stride.tolist()] == [8, 16, 32]
    data = load_data_config(ROOT / "data" / "bccd.yaml")
    loader, _ = create_dataloader(data["val"], IMG, 16, 32, rect=True, workers=0, nc=3)
    metrics = evaluate(model, loader, data["names"], progress=False)
    assert metrics["images"] == 87
    assert metrics["map"] == pytest.approx(VAL_MAP[name], abs=TOLERANCE)

"""The teachers shipped in weights/ (gelan-t, gelan-s at 80 and at 160 epochs with nbs 64, gelan-s at 160
epochs with nbs 16), trained on the bundled BCCD by the commands in README."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.checkpoint.ours import load_checkpoint, load_model
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, create_dataloader
from utils.eval.evaluator import evaluate

ROOT = Path(__file__).resolve().parents[2]
IMG = 256
# what training reported for each best.pt (README); fused fp32 on the CPU gives the same
VAL_MAP = {"gelan-t-bccd256.pt": 0.5086, "gelan-s-bccd256.pt": 0.5547, "gelan-s-bccd256-e160.pt": 0.5909,
           "gelan-s-bccd256-e160-nbs16.pt": 0.6051}
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
    loader, _ = create_dataloader(data["val"], LoaderOptions(IMG, 16, 32, rect=True, workers=0, nc=3))
    metrics = evaluate(model, loader, data["names"], progress=False)
    assert metrics["images"] == 87
    assert metrics["map"] == pytest.approx(VAL_MAP[name], abs=TOLERANCE)


def test_teacher_is_folded_and_computes_what_the_trained_model_computes():
    """load_teacher folds Conv+BN and RepConvN (fewer operations per batch); outputs and the features
    feature KD reads stay those of the model as trained (gelan-s has both kinds of block)."""
    import torch

    from models.common import RepConvN
    from utils.engine.setup import load_teacher

    path = ROOT / "weights" / "gelan-s-bccd256-e160.pt"
    reference = load_model(path).float().eval()
    assert reference.model[-1].training is False and any(isinstance(m, RepConvN) for m in reference.modules())
    teacher = load_teacher(str(path), ["RBC", "WBC", "Platelets"], torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.is_fused and all(m.conv1 is None for m in teacher.modules() if isinstance(m, RepConvN))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in teacher.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))  # the CPU's faster layout
    assert sum(p.numel() for p in teacher.parameters()) < sum(p.numel() for p in reference.parameters())
    images = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, our_feats = teacher(images, feature_layers=teacher.distill_layers)
        theirs, their_feats = reference(images, feature_layers=reference.distill_layers)
    for a, b in zip(our_feats, their_feats):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    (decoded, maps), (ref_decoded, ref_maps) = ours, theirs
    torch.testing.assert_close(decoded, ref_decoded, rtol=1e-3, atol=1e-2)  # boxes in pixels
    assert len(maps) == len(ref_maps) == 3
    for a, b in zip(maps, ref_maps):  # the raw logits class KD and LD read
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_bf16_teacher_teaches_nearly_what_the_fp32_teacher_does():
    """distill_teacher_dtype bf16 (what auto picks on CPUs with AMX / AVX512-BF16): on real BCCD images
    the class probabilities and DFL box distances the student is taught from move only a little
    (measured: largest probability change 0.019, mean 0.0002; mean distance change 0.01 bins)."""
    import torch

    from utils.distill.loss import flatten_maps
    from utils.engine.setup import load_teacher

    path, names = str(ROOT / "weights" / "gelan-s-bccd256-e160.pt"), ["RBC", "WBC", "Platelets"]
    fp32 = load_teacher(path, names, torch.device("cpu"))
    bf16 = load_teacher(path, names, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    data = load_data_config(ROOT / "data" / "bccd.yaml")
    loader, _ = create_dataloader(data["val"], LoaderOptions(IMG, 8, 32, rect=False, workers=0, nc=3))
    images = (next(iter(loader))[0].float() / 255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        flat = [flatten_maps([m.float() for m in model(images.to(dtype))[1]])
                for model, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16))]
    reg = fp32.head.reg_max
    probs = [f[..., 4 * reg:].sigmoid() for f in flat]
    bins = torch.arange(reg, dtype=torch.float32)
    dists = [(f[..., :4 * reg].unflatten(-1, (4, reg)).softmax(-1) * bins).sum(-1) for f in flat]
    prob_change, dist_change = (probs[0] - probs[1]).abs(), (dists[0] - dists[1]).abs()
    assert 0 < prob_change.max() < 0.05 and prob_change.mean() < 0.002  # changed, but a little
    assert dist_change.max() < 0.5 and dist_change.mean() < 0.03


def test_the_demo_takes_a_shipped_teacher():
    """scripts/demo.sh's default teacher is one of the files above (a renamed file would break `make demo`)."""
    import re

    script = (ROOT / "scripts" / "demo.sh").read_text()
    default = re.search(r"TEACHER=\$\{DEMO_TEACHER-([^}]*)\}", script).group(1)
    assert (ROOT / default).is_file() and Path(default).name in VAL_MAP

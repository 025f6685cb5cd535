"""Distillation under DistributedDataParallel (2 CPU processes, gloo): the connectors trained with the
student start equal on every rank, get averaged gradients and so stay equal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3


def _worker(rank: int, port: int, out_dir: str) -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from models.yolo import DetectionModel
    from utils.distill import DistillationLoss, DistillStudent
    from utils.loss import DetectionLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    hyp = yaml.safe_load((ROOT / "hyp" / "hyp.distill.yaml").read_text())
    hyp.update(distill_feat=4.0, distill_feat_type="mse", distill_crosskd=True)  # MSE: connectors on every level
    torch.manual_seed(0)
    student = DetectionModel(ROOT / "models" / "detect" / "yolov9-tiny.yaml", nc=3)
    teacher = DetectionModel(ROOT / "models" / "detect" / "gelan-t.yaml", nc=3).eval().requires_grad_(False)
    torch.manual_seed(100 + rank)  # connectors initialised differently on each rank, as seed + rank would
    loss_fn = DistillationLoss(DetectionLoss(student, hyp), student, teacher, hyp)
    module = DistillStudent(student, loss_fn.modules_, loss_fn.student_layers)
    model = torch.nn.parallel.DistributedDataParallel(module)
    params = list(student.parameters()) + list(loss_fn.trainable_modules().parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    targets = torch.tensor([[0, 0, 0.3, 0.35, 0.3, 0.4], [1, 1, 0.5, 0.5, 0.6, 0.6]])
    for step in range(STEPS):
        torch.manual_seed(1000 * rank + step)  # different images per rank
        images = torch.rand(2, 3, 64, 64)
        out = model(images)
        with torch.no_grad():
            teacher_out, teacher_feats = teacher(images, feature_layers=loss_fn.teacher_layers)
        loss, _ = loss_fn(out.preds, teacher_out, targets, out.feats, teacher_feats, out.cross)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in loss_fn.trainable_modules().parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"gathered": gathered, "count": flat.numel()}, Path(out_dir) / "connectors.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_connectors_stay_equal_across_ranks(tmp_path):
    mp.spawn(_worker, args=(29557, str(tmp_path)), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "connectors.pt", weights_only=True)
    first, second = result["gathered"]
    assert result["count"] > 1000  # the MSE and CrossKD connectors are there
    assert torch.equal(first, second)

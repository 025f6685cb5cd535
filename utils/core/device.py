"""Device selection, seeding, the distributed (torchrun) environment and the wrappers it puts on a model."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from utils.core.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = -1
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as set by torchrun."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", -1)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def select_device(device: str | int | None = "", local_rank: int = -1) -> torch.device:
    """Turn a YOLO-style ``--device`` value ('', 'cpu', '0', '0,1', 'cuda:1', 'mps') into a device.

    '' picks the first CUDA device when there is one, else the CPU. Under torchrun the local rank
    chooses the GPU. An unavailable device raises :class:`UserError`.
    """
    spec = str(device if device is not None else "").strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps requested but MPS is not available on this machine")
        return torch.device("mps")
    if not spec:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", max(local_rank, 0))
    ids = [part for part in spec.split(",") if part]
    if not all(part.isdigit() for part in ids):
        raise UserError(f"--device {device!r} is not understood: use cpu, 0, 0,1 or cuda:0")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available (use --device cpu)")
    if max(int(i) for i in ids) >= torch.cuda.device_count():
        raise UserError(f"--device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    index = int(ids[local_rank]) if 0 <= local_rank < len(ids) else int(ids[0])
    return torch.device("cuda", index)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict:
    """Snapshot of every global RNG, saved in checkpoints so that a resumed run continues identically."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array is stored as a tensor so that torch.load(weights_only=True) accepts it
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""The data a benchmark trains on: a data.yaml (BCCD by default, made by its data config's
``convert:`` block on first use) or the tiny synthetic set of ``--dry-run``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.harness.cli import DRY
from benchmarks.harness.commands import ROOT
from utils.core.errors import UserError


BCCD_DATA = ROOT / "data" / "bccd.yaml"  # its convert: block makes the YOLO labels on first use


def dry_run_data(work: Path) -> Path:
    """A tiny synthetic set for ``--dry-run``; its val images double as the test split."""
    import yaml

    from utils.data.synthetic import generate

    root = work / "data" / "synthetic-dry"
    shutil.rmtree(root, ignore_errors=True)
    yaml_file = generate(root, DRY.n_train, DRY.n_val, DRY.img, DRY.seed)
    config = yaml.safe_load(yaml_file.read_text())
    config["test"] = config["val"]
    yaml_file.write_text("# dry-run set: synthetic, test = val\n" + yaml.safe_dump(config, sort_keys=False))
    return yaml_file


def resolve_data(opt: argparse.Namespace) -> Path:
    """The data.yaml a benchmark trains on: dry-run synthetic, ``--data``, or BCCD (data/bccd.yaml,
    converted by the data config on first use)."""
    from utils.data.config import load_data_config

    if opt.dry_run:
        return dry_run_data(Path(opt.work))
    config = load_data_config(opt.data or BCCD_DATA)
    if not config.get("val") or not config.get("test"):
        raise UserError(f"--data {opt.data} needs both a val and a test split")
    return Path(config["yaml_file"])


def count_images(split: str | list[str]) -> int:
    """Images in a split as utils.data.config resolves it (folders or list files); the suffixes the
    data loader reads."""
    from utils.data.labels import IMG_FORMATS

    total = 0
    for entry in split if isinstance(split, list) else [split]:
        path = Path(entry)
        if path.is_dir():
            total += sum(1 for p in path.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        else:
            total += sum(1 for line in path.read_text().splitlines() if line.strip())
    return total

"""Per-epoch records of a training run: results.csv and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import csv
from pathlib import Path

from utils.core.atomic import atomic_write
from utils.core.log import LOGGER


class RunLogger:
    """Appends one row per epoch to ``results.csv`` and mirrors the numbers to TensorBoard.

    The column set is fixed by the first row written (or read back from an existing file when a
    run resumes); a later row with new keys is an error in the caller, not silently dropped.
    ``last_epoch``: the last epoch already done. Rows after it in an existing results.csv are dropped
    (a resumed run rewrites the epochs it repeats); when none are left (a new run, -1, e.g. in a
    folder reused with ``--exist-ok``) the file starts anew instead of taking the earlier run's.
    """

    def __init__(self, save_dir: Path, tensorboard: bool = True, last_epoch: int = -1) -> None:
        self.csv_path = Path(save_dir) / "results.csv"
        self.columns: list[str] | None = None
        columns, kept = None, []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                kept = [r for r in reader if int(float(r["epoch"])) <= last_epoch]
                columns = reader.fieldnames
        if not kept:
            self.csv_path.unlink(missing_ok=True)
        else:
            self.columns = list(columns)

            def rewrite(f) -> None:  # atomic: a crash here must not lose the epochs kept
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(kept)

            atomic_write(self.csv_path, rewrite, text=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                LOGGER.warning("tensorboard is not installed: no TensorBoard events are written")
            else:
                self.writer = SummaryWriter(str(save_dir))

    def log(self, row: dict[str, float]) -> None:
        """Write one epoch's numbers (``row['epoch']`` is the x axis)."""
        if self.columns is None:
            self.columns = list(row)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        missing = set(row) - set(self.columns)
        if missing:
            raise KeyError(f"results.csv has no columns {sorted(missing)}")
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(col, "")) for col in self.columns])
        if self.writer is not None:
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def rows(self) -> list[dict[str, str]]:
        """All rows written so far (for plots and tests)."""
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value

"""Parameters and GFLOPs (640 px) of every model yaml, at 80 classes and at 3 (BCCD).

    python -m benchmarks.model_sizes [--img 640] [--nc 80 3]
Counts follow the official YOLOv9 rules (models/info.py): all parameters (the fixed DFL
weights included), GFLOPs of the unfused model.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from models.info import count_params, gflops
from models.yolo import DetectionModel
from benchmarks.harness.commands import command_line
from utils.core.errors import ArgumentParser, cli_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("gelan-s", "gelan-t", "yolov9-s", "yolov9-tiny", "yolov9-tiny-1.0x", "mobilenetv3-small",
                  "yolov5s-af")


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--nc", nargs="+", type=int, default=[80, 3])
    parser.add_argument("--img", type=int, default=640)
    opt = parser.parse_args(argv)
    rows = []
    print("| model | " + " | ".join(f"params (nc={n}) | GFLOPs (nc={n})" for n in opt.nc) + " |")
    print("|---|" + "---:|---:|" * len(opt.nc))
    for name in opt.models:
        cells, row = [], {"model": name}
        for nc in opt.nc:
            with torch.no_grad():
                model = DetectionModel(ROOT / "models" / "detect" / f"{name}.yaml", nc=nc)
                params, flops = count_params(model), gflops(model, opt.img)
            row[f"nc{nc}"] = {"params": params, "gflops": flops}
            cells += [f"{params:,}", f"{flops:.2f}"]
        rows.append(row)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nimg {opt.img}; torch {torch.__version__}; {datetime.date.today().isoformat()}; "
          f"command: {command_line('model_sizes', argv)}")
    return rows


if __name__ == "__main__":
    main()

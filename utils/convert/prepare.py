"""Make the converted set that a data.yaml's ``convert:`` block describes, on first use.

    path: ../datasets/bccd     # where the YOLO set goes (git-ignored)
    convert:
      format: voc              # voc or coco
      source: bccd             # the export, relative to the yaml's folder
      # optional: layout, val_fraction, test_fraction, seed (and skip_difficult for voc)

The yaml's ``names`` fix the class order. A marker file in the set records the source, the options,
the names and a fingerprint of the source files (paths, sizes, modification times); while it
matches, nothing is converted again. Processes that start at once are safe: each converts into a
private folder and renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from utils.convert.coco import convert_coco_export
from utils.convert.voc import convert_voc
from utils.convert.writer import written_by_us
from utils.core.atomic import swap_in_folder
from utils.core.errors import UserError
from utils.core.log import LOGGER

MARKER = ".convert.json"
MARKER_VERSION = 1
OPTIONS = {"voc": {"layout", "val_fraction", "test_fraction", "seed", "skip_difficult"},
           "coco": {"val_fraction", "test_fraction", "seed"}}
OPTION_TYPES = {"layout": (str, "a layout name"), "val_fraction": ((int, float), "a number"),
                "test_fraction": ((int, float), "a number"), "seed": (int, "an integer"),
                "skip_difficult": (bool, "true or false")}
CONVERTERS = {"voc": convert_voc, "coco": convert_coco_export}


def source_fingerprint(source: Path) -> str:
    """Hash of the relative paths, sizes and modification times of the files of ``source``."""
    digest = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        st = path.stat()
        rel = path.name if path == source else path.relative_to(source).as_posix()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_spec(yaml_file: Path, spec: Any) -> tuple[str, Path, dict]:
    if not isinstance(spec, dict):
        raise UserError(f"{yaml_file}: 'convert' must be a mapping with 'format' and 'source'")
    fmt, raw = spec.get("format"), spec.get("source")
    if fmt not in CONVERTERS:
        raise UserError(f"{yaml_file}: convert 'format' must be one of {', '.join(CONVERTERS)}, got {fmt!r}")
    if not isinstance(raw, str) or not raw:
        raise UserError(f"{yaml_file}: convert 'source' must be the path of the export")
    source = Path(raw).expanduser()
    source = (source if source.is_absolute() else yaml_file.parent / source).resolve()
    if not source.exists():
        raise UserError(f"{yaml_file}: convert source {source} not found")
    options = {k: v for k, v in spec.items() if k not in ("format", "source")}
    unknown = sorted(set(options) - OPTIONS[fmt])
    if unknown:
        raise UserError(f"{yaml_file}: unknown convert setting(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(OPTIONS[fmt]))})")
    for key, value in options.items():
        kind, wording = OPTION_TYPES[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserError(f"{yaml_file}: convert '{key}' must be {wording}, got {value!r}")
    return fmt, source, options


def ensure_converted(yaml_file: Path, root: Path, spec: Any, names: list[str]) -> Path:
    """Convert the source of ``spec`` into ``root`` unless the same conversion is there; ``root/data.yaml``."""
    fmt, source, options = _read_spec(yaml_file, spec)
    wanted = {"version": MARKER_VERSION, "format": fmt, "source": str(source), "options": options,
              "names": list(names), "files": source_fingerprint(source)}
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                return root / "data.yaml"
        except (OSError, ValueError):
            pass
        LOGGER.info(f"{root}: its source or settings changed; converting {source} again")
    elif root.exists() and any(root.iterdir()) and not written_by_us(root):
        raise UserError(f"{root} (the 'path' of {yaml_file}) exists and was not written by utils.convert; "
                        f"move it away")
    else:
        LOGGER.info(f"{yaml_file}: first use, converting {source} into {root}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        CONVERTERS[fmt](source, tmp, names=list(names), **options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = tmp / "data.yaml"  # its header names the command: name the final folder, not tmp
    written.write_text(written.read_text().replace(str(tmp), str(root), 1))
    (tmp / MARKER).write_text(json.dumps(wanted))
    swap_in_folder(tmp, root, MARKER)
    return root / "data.yaml"

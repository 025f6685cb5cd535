"""Convert Pascal VOC and COCO exports into YOLO labels plus a data.yaml.

    python -m utils.convert voc SRC DST [--layout auto|devkit|flat|labelimg|splits] [--names A,B,C]
                                        [--skip-difficult] [--val-fraction 0.2] [--test-fraction 0]
                                        [--seed 0] [--copy]
    python -m utils.convert coco SRC DST [--names A,B,C] [--val-fraction ...] [--copy]
    python -m utils.convert coco JSON IMAGES_DIR DST [--split train]
    python -m utils.convert prepare DATA.yaml

VOC layouts (detected, or forced with ``--layout``): ``devkit`` (VOCdevkit/VOC2007, VOC2012, merged;
ImageSets/Main splits), ``splits`` (train/ valid/ test/ folders, the Roboflow export), ``flat`` (XML
files in folders of any name, e.g. images/ + annots/), ``labelimg`` (XML beside each image); each XML
finds its image by file name wherever it lies under the export; see :mod:`.voc_layout` and
:mod:`.voc` for what is decided per file. COCO: one JSON per split folder (Roboflow's
``train/_annotations.coco.json``) or one JSON; see :mod:`.coco`. An export without splits is split
deterministically (``--val-fraction``, ``--test-fraction``, ``--seed``) and the split is logged.

The result is ``DST/images/<split>/`` (symlinks to the source images, or copies with ``--copy``),
``DST/labels/<split>/*.txt`` (``class cx cy w h`` normalised) and ``DST/data.yaml`` with the class
list. Problems are reported one line per file, counted by kind, and the file is skipped; a folder
with nothing usable is one error line and exit code 2. YOLO-format exports need no conversion: their
data.yaml loads as it is (:mod:`utils.data.config` follows the Ultralytics path rules). The package may
import ``utils.core`` and ``utils.data`` (the image suffixes, and the data.yaml reader of ``prepare``),
nothing from ``models``.
"""

from utils.convert.cli import main
from utils.convert.coco import convert_coco, convert_coco_export
from utils.convert.prepare import ensure_converted
from utils.convert.voc import convert_voc
from utils.convert.writer import ConversionResult

__all__ = ["ConversionResult", "convert_coco", "convert_coco_export", "convert_voc", "ensure_converted", "main"]

"""The command line of :mod:`utils.convert` (see the package docstring for the layouts)."""

from __future__ import annotations

import argparse

from utils.convert.coco import convert_coco, convert_coco_export
from utils.convert.voc import convert_voc
from utils.convert.voc_layout import LAYOUTS
from utils.convert.writer import (DEFAULT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SPLITS,
                                  ConversionResult, parse_names)
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging


def _split_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
        help="share of the images put in val when the export gives no split (default %(default)s)")
    add("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
        help="share of the images put in test when the export gives no split (default %(default)s)")
    add("--seed", type=int, default=DEFAULT_SEED, help="seed of that split (default %(default)s)")
    add("--names", help="class order: A,B,C or a file with one name per line (default: classes.txt in SRC, "
                        "else the names found, sorted; COCO: by category id)")
    add("--copy", action="store_true", help="copy the images instead of symlinking them")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m utils.convert",
                            description="Convert Pascal VOC or COCO exports to YOLO labels + data.yaml.")
    sub = parser.add_subparsers(dest="format", required=True, parser_class=ArgumentParser)
    voc = sub.add_parser("voc", help="Pascal VOC XML: VOCdevkit, train/ valid/ test/ folders, XML and images "
                                     "in folders of any name (paired by file name), LabelImg")
    voc.add_argument("src", help="the export's folder")
    voc.add_argument("dst", help="output folder")
    voc.add_argument("--layout", choices=LAYOUTS, default="auto",
                     help="force a layout (flat: ignore ImageSets split files; auto: detect)")
    voc.add_argument("--skip-difficult", action="store_true",
                     help="drop objects marked difficult (default: keep them as ordinary boxes)")
    _split_flags(voc)
    coco = sub.add_parser("coco", help="COCO JSON: an export with train/ valid/ test/ folders, one JSON, "
                                       "or JSON IMAGES DST for one split")
    coco.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or JSON IMAGES_DIR DST")
    coco.add_argument("--split", choices=SPLITS, help="with JSON IMAGES_DIR DST: the split (default: from "
                                                      "the JSON's name, else train)")
    _split_flags(coco)
    prepare = sub.add_parser("prepare", help="make the set a data.yaml's convert: or synthetic: block describes")
    prepare.add_argument("data", help="the data.yaml, e.g. data/bccd.yaml")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> ConversionResult | dict:
    setup_logging()
    opt = parse_args(argv)
    if opt.format == "prepare":
        from utils.data.config import load_data_config

        config = load_data_config(opt.data)
        LOGGER.info(f"{config['yaml_file']}: ready in {config['path']}")
        return config
    names = parse_names(opt.names)
    if opt.format == "voc":
        return convert_voc(opt.src, opt.dst, opt.copy, names, opt.skip_difficult, opt.val_fraction,
                           opt.test_fraction, opt.seed, opt.layout)
    if len(opt.paths) == 3:
        return convert_coco(*opt.paths, copy=opt.copy, split=opt.split, names=names)
    if len(opt.paths) != 2:
        raise UserError("coco takes SRC DST (an export folder or one JSON) or JSON IMAGES_DIR DST")
    if opt.split:
        raise UserError("--split goes with the form JSON IMAGES_DIR DST")
    return convert_coco_export(*opt.paths, copy=opt.copy, names=names, val_fraction=opt.val_fraction,
                               test_fraction=opt.test_fraction, seed=opt.seed)

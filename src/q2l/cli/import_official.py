"""`q2l-import`: an official Query2Label release checkpoint as a q2l checkpoint.

    q2l-import /w/Q2L-R101-448/checkpoint.pkl /w/q2l-r101-448.pt \
        experiment=coco_r101_448 dataset.root=/data/coco

What it reads and how: q2l.training.importing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from q2l.training.importing import import_official
from q2l.utils.errors import is_user_error


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, import, print where the q2l checkpoint is. Exit status 0 when
    written, 2 for a problem with the arguments, the config or the files (printed)."""
    parser = argparse.ArgumentParser(
        prog="q2l-import",
        description="Convert an official Query2Label checkpoint (SlongLiu/query2labels) into a "
        "q2l checkpoint that eval.py and init_from accept.",
    )
    parser.add_argument("source", help="official checkpoint (.pkl/.pth.tar with a state_dict)")
    parser.add_argument("output", help="q2l checkpoint to write (must not exist)")
    parser.add_argument(
        "overrides", nargs="*", help="train.py overrides, e.g. experiment=coco_r101_448"
    )
    parser.add_argument(
        "--official-config",
        help="the official run's JSON config (default: config_new.json, else config.json, beside "
        "the checkpoint): normalisation, image size, heads, dropout",
    )
    parser.add_argument(
        "--class-file",
        help="class names, one per line, in the checkpoint's order (default: the data set's, "
        "or COCO's 80 when its annotations are not at hand)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = import_official(
            args.source, args.output, args.overrides, args.class_file, args.official_config
        )
    except Exception as error:
        if not is_user_error(error):
            raise  # a bug: its traceback says where
        print(f"q2l-import: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}: evaluate with `python eval.py ckpt={path}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

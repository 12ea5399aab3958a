"""`q2l-validate-data`: check a data set's files and labels before training on it.

q2l-validate-data dataset=coco2014 dataset.root=/data/coco [dataset.validate=full]
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from q2l.data.validate import DataValidationError, validate_splits
from q2l.utils.printable import printable


def main(argv: Sequence[str] | None = None) -> int:
    """`q2l-validate-data dataset=<name> [dataset.root=...] [dataset.validate=full] [overrides]`.

    Composes the training config (so any dataset option and override works), builds both splits
    without transforms, checks them and prints the report. Exit status 0: no problems; 1: problems
    (all printed); 2: the overrides do not compose.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from q2l.config import CONFIG_DIR
    from q2l.config.checks import ConfigValueError, check_values, choice

    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(main.__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        check_values(cfg)
        data = cfg.dataset
        level = choice(data.get("validate", "quick"))
    except (HydraException, OmegaConfBaseException, ConfigValueError) as error:
        print(f"q2l-validate-data: {error}", file=sys.stderr)
        return 2
    # Only reads: a data set's `prepare` step (the demo's builder) is not run by a check.
    splits, problems = {}, []
    for name in ("train", "val"):
        try:
            splits[name] = instantiate(data[name], max_image_pixels=data.max_image_pixels)
        except HydraException as error:
            problems.append(f"{name}: {error.__cause__ or error}")
    print(f"data set {data.name} at {printable(str(data.get('root')))}")
    if problems:
        print(printable("\n".join(f"PROBLEM: {text}" for text in problems)))
        return 1
    try:
        report = validate_splits(
            splits["train"], splits["val"], level="full" if level == "full" else "quick"
        )
    except DataValidationError as error:
        print(printable(error.report.format()))  # file names that are not UTF-8, escaped
        return 1
    print(printable(report.format()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`q2l-import`: an official Query2Label release checkpoint as a q2l checkpoint.

    q2l-import /w/Q2L-R101-448/checkpoint.pkl /w/q2l-r101-448.pt \
        experiment=coco_r101_448 dataset.root=/data/coco
    make eval CKPT=/w/q2l-r101-448.pt
    python train.py experiment=coco_r101_448 dataset.root=/data/coco init_from=/w/q2l-r101-448.pt

The overrides compose the training config exactly as `train.py` does (the preset names the
backbone, the data set and the settings eval and fine-tuning then use); the head's sizes are read
from the checkpoint itself (hidden width, FFN, layers, input projection, which decoder layers keep
self-attention), so only `model.num_heads` (default 4, the official one) must be right. The
checkpoint is read without running code from it (weights only, NumPy scalars allowed), the
converted weights load strictly, and the output file is new: an existing one is never replaced.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.data.coco import COCO_CLASSES
from q2l.data.label_lists import read_class_file
from q2l.models.official import (
    convert_official_state_dict,
    official_head_options,
    official_state_dict,
)
from q2l.models.weights import load_torch_file
from q2l.training.build import build_model
from q2l.training.checkpoint import load_strict, save_checkpoint

log = logging.getLogger("q2l.import")


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
        "--class-file",
        help="class names, one per line, in the checkpoint's order (default: the data set's, "
        "or COCO's 80 when its annotations are not at hand)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = import_official(args.source, args.output, args.overrides, args.class_file)
    except (ValueError, OSError) as error:
        print(f"q2l-import: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}: evaluate with `python eval.py ckpt={path}`")
    return 0


def import_official(
    source: str | Path,
    output: str | Path,
    overrides: Sequence[str] = (),
    class_file: str | None = None,
) -> Path:
    """Convert official checkpoint `source` into q2l checkpoint `output`; returns `output`."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; q2l-import writes a new file only")
    checkpoint = load_torch_file(source, "official Query2Label checkpoint", numpy_scalars=True)
    state = official_state_dict(checkpoint)
    head = official_head_options(state)
    cfg = _compose(overrides)
    _adopt_head_options(cfg, head)
    check_values(cfg)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = build_model(config, head["num_classes"], pretrained=False)
    load_strict(model, convert_official_state_dict(state, model), Path(source))
    class_names = _class_names(cfg, class_file, head["num_classes"])
    official = checkpoint if isinstance(checkpoint, dict) else {}
    save_checkpoint(
        {
            "model": model.state_dict(),
            "ema": None,
            "eval_weights": "raw",
            "epoch": int(official.get("epoch", 0)),
            "step": 0,
            "metrics": {},
            "history": [],
            "class_names": class_names,
            "config": config,
            "precision": "fp32",
            "imported_from": {
                "path": str(Path(source).resolve()),
                "epoch": int(official.get("epoch", 0)),
                # The official code's own score: VOC-interpolated mAP (q2l's mAP_voc).
                "best_mAP_voc": float(official["best_mAP"]) if "best_mAP" in official else None,
            },
        },
        output,
    )
    log.info(
        "imported %s: %s on %s, %d classes, hidden %d, %d encoder / %d decoder layers, "
        "input_proj=%s, decoder_self_attention=%s",
        source,
        config["model"]["_target_"].rsplit(".", 1)[-1],
        config["backbone"]["name"],
        head["num_classes"],
        head["hidden_dim"],
        head["num_encoder_layers"],
        head["num_decoder_layers"],
        head["input_proj"],
        head["decoder_self_attention"],
    )
    return output


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ValueError(f"the overrides do not compose: {error}") from None
    finally:
        GlobalHydra.instance().clear()


def _adopt_head_options(cfg: DictConfig, head: dict[str, Any]) -> None:
    """Set the model options the weights fix, logging each one the composed config had else."""
    if not str(cfg.model.get("_target_", "")).endswith("Query2Label"):
        raise ValueError(
            f"model={cfg.model.get('_target_')}: an official checkpoint is a Query2Label "
            "(model=q2l)"
        )
    for key, value in head.items():
        if key == "num_classes":
            continue
        if cfg.model[key] != value:
            log.info(
                "model.%s=%s (from the checkpoint; the config had %s)", key, value, cfg.model[key]
            )
            cfg.model[key] = value


def _class_names(cfg: DictConfig, class_file: str | None, num_classes: int) -> list[str]:
    """From `class_file`, else the composed data set's val split, else COCO's when it is COCO."""
    if class_file:
        names = read_class_file(class_file)
    else:
        try:
            from hydra.utils import instantiate

            names = list(instantiate(cfg.dataset.val).class_names)
        except Exception as error:  # no data at hand: whatever the reader raised
            if not str(cfg.dataset.name).startswith("coco"):
                raise ValueError(
                    f"the class names come from the data set ({cfg.dataset.name}), which cannot "
                    f"be read here ({error}); pass --class-file"
                ) from None
            log.info("data set not readable here (%s): COCO's 80 class names", error)
            names = list(COCO_CLASSES)
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names for a checkpoint with {num_classes} label queries"
        )
    return names


if __name__ == "__main__":
    sys.exit(main())

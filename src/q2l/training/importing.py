"""An official Query2Label release checkpoint as a q2l checkpoint (the `q2l-import` command).

    q2l-import /w/Q2L-R101-448/checkpoint.pkl /w/q2l-r101-448.pt \
        experiment=coco_r101_448 dataset.root=/data/coco
    make eval CKPT=/w/q2l-r101-448.pt
    python train.py experiment=coco_r101_448 dataset.root=/data/coco init_from=/w/q2l-r101-448.pt

The overrides compose the training config exactly as `train.py` does (the preset names the
backbone, the data set and the settings eval and fine-tuning then use). The head's sizes are read
from the checkpoint itself (hidden width, FFN, layers, input projection, which decoder layers keep
self-attention). What the weights do not tell comes from the run's own config, the
`config_new.json` a release ships beside its checkpoint (or a training run's `config.json`, or
`--official-config PATH`; q2l.models.official_config): input normalisation, image size, heads,
dropout, layout. Without one the official argument defaults apply, the image size is read from the
checkpoint's position buffer, and a TResNet import warns that its normalisation is a guess, naming
the one chosen. An override given on the command line wins over the run's config, with a warning
where the two differ. The checkpoint is read without running code from it (weights only, NumPy
scalars allowed), the converted weights load strictly, and the output file is new: an existing one
is never replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.data.coco import COCO_CLASSES
from q2l.data.label_lists import read_class_file
from q2l.models.backbone import normalization
from q2l.models.official import (
    check_backbone_family,
    convert_official_state_dict,
    official_backbone_family,
    official_head_options,
    official_state_dict,
)
from q2l.models.official_config import (
    CONFIG_NAMES,
    OfficialRunConfig,
    find_official_config,
    read_official_config,
)
from q2l.models.weights import load_torch_file
from q2l.training.build import build_model
from q2l.training.checkpoint import load_strict, save_checkpoint

log = logging.getLogger("q2l.import")


def import_official(
    source: str | Path,
    output: str | Path,
    overrides: Sequence[str] = (),
    class_file: str | None = None,
    official_config: str | Path | None = None,
) -> Path:
    """Convert official checkpoint `source` into q2l checkpoint `output`; returns `output`.

    `official_config` is the run's JSON config; by default the one beside `source`, if any.
    """
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; q2l-import writes a new file only")
    checkpoint = load_torch_file(source, "official Query2Label checkpoint", numpy_scalars=True)
    state = official_state_dict(checkpoint)
    config_path = find_official_config(source, official_config)
    run = read_official_config(config_path) if config_path else None
    head = official_head_options(state)
    cfg = _compose(overrides)
    _check_backbone(cfg, state, run)
    _adopt_head_options(cfg, head)
    _adopt_run_settings(cfg, state, head, run, _overridden_keys(overrides), Path(source))
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
                "official_config": (
                    {"path": str(run.path.resolve()), "recorded": dict(run.recorded)}
                    if run
                    else None
                ),
            },
        },
        output,
    )
    log.info(
        "imported %s: %s on %s, %d classes, hidden %d, %d encoder / %d decoder layers, "
        "input_proj=%s, decoder_self_attention=%s, %d px, normalization=%s",
        source,
        config["model"]["_target_"].rsplit(".", 1)[-1],
        config["backbone"]["name"],
        head["num_classes"],
        head["hidden_dim"],
        head["num_encoder_layers"],
        head["num_decoder_layers"],
        head["input_proj"],
        head["decoder_self_attention"],
        config["dataset"]["image_size"],
        config["backbone"]["normalization"],
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


def _check_backbone(cfg: DictConfig, state: dict[str, Any], run: OfficialRunConfig | None) -> None:
    """The composed backbone must be the run's (by its config) and of the weights' kind."""
    name = str(cfg.backbone.name)
    wanted = run.timm_backbone() if run else None
    if wanted is not None and wanted.split(".")[0] != name.split(".")[0]:
        raise ValueError(
            f"{run.path} records backbone {run.get('backbone')} (timm {wanted}), but the composed "
            f"config builds {name}: pass backbone.name={wanted}, or the preset of that model"
        )
    check_backbone_family(state, name)


def _adopt_run_settings(
    cfg: DictConfig,
    state: dict[str, Any],
    head: dict[str, Any],
    run: OfficialRunConfig | None,
    explicit: set[str],
    source: Path,
) -> None:
    """Set what the weights do not tell from the run's config (or the official defaults): heads,
    dropout, image size, input normalisation. A key given on the command line wins."""
    where = run.path.name if run else "the official default"
    if run is not None:
        if run.get("pre_norm"):
            raise ValueError(
                f"{run.path} records pre_norm=true: the official pre-norm layout cannot run (its "
                "forward_pre uses the layers it removes), so weights trained with it do not exist "
                "as a working model; q2l's norm=pre is a different layout"
            )
        _check_against_weights(run, head)
    settings: dict[str, tuple[Any, str]] = {
        "model.dropout": (float(run.get("dropout")) if run else 0.1, where),
    }
    if run is not None:
        settings["model.num_heads"] = (run.get("nheads"), where)
        settings["backbone.normalization"] = (run.normalization, where)
    image_size = _image_size_from_positions(state)
    if run is not None and run.has("img_size"):
        if image_size is not None and image_size != run.get("img_size"):
            log.warning(
                "%s records img_size=%s, but the checkpoint's position buffer is for %s px",
                run.path,
                run.get("img_size"),
                image_size,
            )
        settings["dataset.image_size"] = (run.get("img_size"), where)
    elif image_size is not None:
        settings["dataset.image_size"] = (image_size, "the checkpoint's position buffer")
    for key, (value, origin) in settings.items():
        _set(cfg, key, value, origin, explicit)
    if _is_tresnet(cfg) and not (run and run.has("orid_norm")):
        _warn_unknown_normalization(cfg, source, run, explicit)


def _set(cfg: DictConfig, key: str, value: Any, origin: str, explicit: set[str]) -> None:
    current = OmegaConf.select(cfg, key)
    if current == value:
        return
    if key in explicit:
        log.warning("%s=%s from the command line, where %s has %s", key, current, origin, value)
        return
    log.info("%s=%s (from %s; the config had %s)", key, value, origin, current)
    OmegaConf.update(cfg, key, value)


def _check_against_weights(run: OfficialRunConfig, head: dict[str, Any]) -> None:
    """Warn where the run's config disagrees with the weights (the weights are used)."""
    pairs = {
        "num_class": head["num_classes"],
        "hidden_dim": head["hidden_dim"],
        "dim_feedforward": head["ffn_dim"],
        "enc_layers": head["num_encoder_layers"],
        "dec_layers": head["num_decoder_layers"],
        "keep_input_proj": head["input_proj"],
    }
    for name, from_weights in pairs.items():
        if run.has(name) and run.get(name) != from_weights:
            log.warning(
                "%s records %s=%s, the weights have %s: the weights are used",
                run.path,
                name,
                run.get(name),
                from_weights,
            )
    flags = ("keep_first_self_attn_dec", "keep_other_self_attn_dec")
    recorded = any(run.has(flag) for flag in flags)
    if recorded and run.decoder_self_attention != head["decoder_self_attention"]:
        log.warning(
            "%s's self-attention flags mean decoder_self_attention=%s, the weights have %s: the "
            "weights are used",
            run.path,
            run.decoder_self_attention,
            head["decoder_self_attention"],
        )


def _image_size_from_positions(state: dict[str, Any]) -> int | None:
    """The training resolution a stride-32 backbone's fixed position buffer was made for."""
    buffer = state.get("backbone.1.pe")
    if buffer is None or official_backbone_family(state) not in ("resnet", "tresnet", "swin"):
        return None
    return 32 * int(buffer.shape[-2])


def _is_tresnet(cfg: DictConfig) -> bool:
    return str(cfg.backbone.name).startswith("tresnet")


def _warn_unknown_normalization(
    cfg: DictConfig, source: Path, run: OfficialRunConfig | None, explicit: set[str]
) -> None:
    """A TResNet import whose input normalisation no config records: say what is used."""
    if "backbone.normalization" in explicit:
        return
    choice = str(cfg.backbone.normalization)
    mean, std = normalization(str(cfg.backbone.name), choice)
    where = (
        f"{run.path} has no orid_norm entry"
        if run
        else f"no official config ({' or '.join(CONFIG_NAMES)}) is beside {source}"
    )
    log.warning(
        "%s: how this TResNet's inputs were normalised is not recorded. Using "
        "backbone.normalization=%s (mean %s, std %s). The official code normalises with ImageNet "
        "statistics unless --orid_norm (the released TResL-22k model was trained with orid_norm, "
        "mean 0 / std 1); pass --official-config PATH, or backbone.normalization=imagenet or none",
        where,
        choice,
        _rounded(mean),
        _rounded(std),
    )


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]


def _overridden_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys the command-line overrides name (`a.b=1`, `+a.b=1`, `++a.b=1`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


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

"""The checkpoint format's version, and the one step that brings older checkpoints up to it.

Every load goes through `upgrade` (q2l.training.checkpoint.load_checkpoint), so the rest of q2l
reads one format only: no other module knows what earlier versions wrote. Each change of the
format bumps FORMAT_VERSION and adds its conversion here, in order.

Version 1 (q2l 0.1 and its successors up to this refactor) to version 2:

- configs written before later options existed lack their keys: the upgrade fills in the value
  each run had in effect (no `backbone.normalization` meant the pretrained config's, a Query2Label
  head without `model.norm` had the official post-norm layout, ...), and values retyped since
  are rewritten (`decoder_self_attention: false` is "none"), so a resumed run compares equal to
  the same settings today and is rebuilt as it trained; q2l 0.1's `backbone.kwargs` is
  `timm_kwargs`;
- `rng` holds one entry per process; `progress.validated_epoch` is present (0.1 validated every
  epoch it trained);
- the raw weights are called "raw" (was "model") in `eval_weights` and the epoch records, the
  vocabulary of eval's `weights=` option;
- the top-3 metrics that counted all three classes are `*_top3_all` (today's `*_top3` follows the
  literature: a top-3 class counts only at or above the threshold, q2l.metrics).

Version 2 to version 3: `dataset.decode` exists (the runs before it decoded in the DataLoader
workers: "workers").
"""

from __future__ import annotations

import copy
from typing import Any

FORMAT_VERSION = 3

# Config keys added after runs were started, with the value a run had in effect before, and
# which nodes have them (by the node's `_target_` ending; None: every such node).
_ADDED_KEYS: list[tuple[str, Any, str | None]] = [
    ("backbone.freeze", "none", None),
    ("backbone.frozen_bn", False, None),
    ("backbone.normalization", "pretrained", None),
    ("backbone.timm_kwargs", {}, None),
    ("model.norm", "post", "Query2Label"),
    ("trainer.monitor", "mAP", None),
    ("trainer.early_stop_rule", "best", None),
    ("loss.class_priors_file", None, "PartialAsymmetricLoss"),
    ("augment.randaugment_policy", "torchvision", None),
    ("dataset.decode", "workers", None),  # version 3
]
# Values retyped after runs were started: (key, saved value, the same value today).
_RETYPED = [
    ("backbone.timm_kwargs", None, {}),
    ("model.decoder_self_attention", False, "none"),
    ("model.decoder_self_attention", True, "all"),
]
# Metrics renamed in version 2: the top-3 metrics that count all three classes.
_TOP3 = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint` (of any version up to FORMAT_VERSION) in today's format; a new dict, the
    tensors shared. A current checkpoint is returned as it is."""
    version = checkpoint.get("format_version", 1)
    if version >= FORMAT_VERSION:
        return checkpoint
    upgraded = {**checkpoint}
    _config_in_effect(upgraded)  # fills only the keys a config lacks: right for every version
    if version < 2:
        _loop_position(upgraded)
        _record_names(upgraded)
    upgraded["format_version"] = FORMAT_VERSION
    return upgraded


def _config_in_effect(checkpoint: dict[str, Any]) -> None:
    config = checkpoint["config"] = copy.deepcopy(checkpoint.get("config") or {})
    backbone = config.get("backbone")
    if isinstance(backbone, dict):
        if "kwargs" in backbone:
            backbone["timm_kwargs"] = backbone.pop("kwargs")
        backbone.pop("prepare", None)
    for key, saved, today in _RETYPED:
        section, name = key.split(".")
        node = config.get(section)
        if isinstance(node, dict) and name in node and node[name] == saved:
            node[name] = today
    for key, value, target in _ADDED_KEYS:
        section, name = key.split(".")
        node = config.get(section)
        if not isinstance(node, dict) or name in node:
            continue
        if target is None or str(node.get("_target_", "")).endswith(target):
            node[name] = copy.deepcopy(value)


def _loop_position(checkpoint: dict[str, Any]) -> None:
    if "rng" in checkpoint and not isinstance(checkpoint["rng"], list):
        checkpoint["rng"] = [checkpoint["rng"]]
    progress = checkpoint.get("progress")
    if isinstance(progress, dict) and "validated_epoch" not in progress:
        checkpoint["progress"] = {**progress, "validated_epoch": progress["epoch"]}


def _record_names(checkpoint: dict[str, Any]) -> None:
    if checkpoint.get("eval_weights") == "model":
        checkpoint["eval_weights"] = "raw"
    if isinstance(checkpoint.get("metrics"), dict):
        checkpoint["metrics"] = upgrade_record(checkpoint["metrics"])
    if isinstance(checkpoint.get("history"), list):
        checkpoint["history"] = [upgrade_record(record) for record in checkpoint["history"]]


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch record (metrics.jsonl line) of format version 1 in today's names."""
    upgraded = {}
    for key, value in record.items():
        name, suffix = (key.removesuffix("_ema"), "_ema") if key.endswith("_ema") else (key, "")
        metric, _, rest = name.partition("_top3")
        if metric in _TOP3 and name == f"{metric}_top3" and not rest:
            key = f"{metric}_top3_all{suffix}"
        upgraded[key] = value
    if upgraded.get("eval_weights") == "model":
        upgraded["eval_weights"] = "raw"
    return upgraded

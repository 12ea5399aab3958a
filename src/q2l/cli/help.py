"""`--help` of the commands: what the command does, its config groups with their options, and its
keys, each with the one-line description its schema gives (q2l.config: the `help` of a field, or
the `Args:` line of the callable a node builds). Nothing is composed, so `--help` works with no
other argument (a run would need a data set first).

    python train.py --help                # groups, options and the main keys
    python train.py --help trainer        # every key of a group (or group=option: loss=bce)
"""

from __future__ import annotations

import dataclasses
import textwrap
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from q2l.config import CONFIG_DIR
from q2l.config.commands import AttentionConf, EvalConf, ExportConf, PredictConf
from q2l.config.fields import described
from q2l.config.schemas import DatasetConf, TrainConf, TrainerConf, group_schemas

WIDTH = 100

# The train keys `--help` shows without a topic: group.key (the rest: `--help <group>`).
MAIN_TRAIN_KEYS = {
    "dataset": ("root", "image_size", "batch_size", "num_workers"),
    "backbone": ("name", "pretrained", "weights"),
    "optimizer": ("lr", "weight_decay"),
    "trainer": (
        "epochs",
        "precision",
        "device",
        "monitor",
        "early_stop_patience",
        "ema_decay",
        "accumulate_grad_batches",
        "checkpoint_every_steps",
    ),
    "": ("seed", "resume", "init_from"),
}

COMMANDS: dict[str, dict[str, Any]] = {
    "train": {
        "usage": "python train.py [group=option ...] [key=value ...]      (or q2l-train)",
        "about": "Train a Query2Label multi-label image classifier. A run needs a data set: "
        "experiment=demo (the embedded demo), dataset=<option> dataset.root=DIR, or a paper "
        "preset, experiment=<option>.",
        "examples": [
            "python train.py experiment=demo",
            "python train.py dataset=coco2014 dataset.root=/data/coco backbone=resnet101",
            "python train.py dataset=table dataset.root=/data/kitchen experiment=small",
            "python train.py -m experiment=demo loss.gamma_neg=2,4     # a sweep",
        ],
        "config": "train",
        "schema": TrainConf,
    },
    "eval": {
        "usage": "python eval.py ckpt=PATH [dataset=option dataset.root=DIR] [key=value ...]",
        "about": "Evaluate a checkpoint on its run's val split (or any data set): overall and "
        "per-class metrics, printed and written to a new folder beside the checkpoint.",
        "examples": [
            "python eval.py ckpt=outputs/<run>/checkpoints/best.pt",
            "python eval.py ckpt=.../best.pt calibrate=f1 save_scores=true",
        ],
        "config": "eval",
        "schema": EvalConf,
    },
    "predict": {
        "usage": "python predict.py (ckpt=PATH | model=EXPORT) input=IMAGES output=FILE",
        "about": "Score images with a checkpoint or an export: labels and scores per image, "
        "into a new CSV or JSONL file.",
        "examples": [
            "python predict.py ckpt=.../best.pt input=photos/ output=predictions.jsonl",
            "q2l-predict model=best.onnx input='photos/*.jpg' output=predictions.csv",
        ],
        "config": "predict",
        "schema": PredictConf,
    },
    "export": {
        "usage": "q2l-export ckpt=PATH [format=onnx|torchscript|safetensors] [output=FILE]",
        "about": "Export a checkpoint, checked against PyTorch, with what predict needs beside "
        "the weights (classes, image size, normalisation, thresholds).",
        "examples": ["q2l-export ckpt=.../best.pt format=onnx"],
        "config": "export",
        "schema": ExportConf,
    },
    "attention": {
        "usage": "q2l-attention ckpt=PATH image=IMAGE output=DIR [top_k=3]",
        "about": "Draw where the top labels of one image looked (the last decoder layer's "
        "cross-attention over the feature map).",
        "examples": ["q2l-attention ckpt=.../best.pt image=photo.jpg output=maps/"],
        "config": "attention",
        "schema": AttentionConf,
    },
}


def help_topic(argv: list[str]) -> str | None:
    """The topic of `--help`/`-h` in `argv` ("" for none given), or None without --help."""
    for index, argument in enumerate(argv):
        if argument in ("--help", "-h"):
            rest = [a for a in argv[index + 1 :] if not a.startswith("-")]
            return rest[0] if rest else ""
    return None


def command_help(command: str, topic: str = "") -> str:
    """The text `--help` prints for `command` (a key of COMMANDS), or for one of its groups."""
    spec = COMMANDS[command]
    if topic:
        return _topic_help(command, topic)
    lines = [spec["usage"], "", *_wrap(spec["about"]), "", "Examples:"]
    lines += [f"  {example}" for example in spec["examples"]]
    groups = _groups(spec["config"])
    if groups:
        lines += ["", "Config groups (group=option; the default in brackets):"]
        for group, default in groups.items():
            options = _options(group)
            chosen = "(required)" if default == "???" else f"[{default}]" if default else ""
            lines += _entry(f"  {group}", f"{chosen} {', '.join(options)}".strip(), 18)
    lines += ["", "Keys (key=value, its default, what it does):"]
    for key, default, about in _main_keys(command):
        lines += _key_entry(key, default, about)
    if command == "train":
        lines += [
            "",
            "Every key of a group: python train.py --help <group> (trainer, dataset, backbone,",
            "model, loss, optimizer, schedule, augment; or group=option, e.g. loss=bce).",
            "The whole composed config: python train.py experiment=demo --cfg job",
        ]
    lines += ["Documentation: README.md and docs/ (q2l's repository)."]
    return "\n".join(lines)


def _topic_help(command: str, topic: str) -> str:
    group, _, option = topic.partition("=")
    schema = _group_schema(group, option or _groups(COMMANDS[command]["config"]).get(group, ""))
    if command != "train" or schema is None:
        known = ", ".join(["trainer", *_groups("train")])
        return f"no help on {topic!r}; train's groups: {known}"
    title = f"{group}={option}" if option else group
    package = _package(group, option or _groups(COMMANDS[command]["config"]).get(group, ""))
    lines = [f"Keys of {title} ({package}.<key>=value, its default, what it does):"]
    values = _option_values(group, option)
    for key, default, about in described(schema):
        lines += _key_entry(f"{package}.{key}", values.get(key, default), about)
    return "\n".join(lines)


def _package(group: str, option: str) -> str:
    """Where an option's keys live: its `# @package` header (logger=mlflow: logger.mlflow, so
    that several loggers can be chosen at once), else the group itself."""
    path = Path(CONFIG_DIR) / group / f"{option}.yaml"
    first = path.read_text().partition("\n")[0] if option and path.is_file() else ""
    package = first.removeprefix("# @package").strip() if first.startswith("# @package") else ""
    return package if package and not package.startswith("_") else group  # not _global_


def _groups(config_name: str) -> dict[str, str]:
    """{group: default option} from a primary config's defaults list (config groups only)."""
    defaults = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{config_name}.yaml"))
    groups = {}
    for entry in defaults.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            name = key.removeprefix("optional ")
            if not key.startswith("override") and not name.startswith(("hydra", "/")):
                if (Path(CONFIG_DIR) / name).is_dir():
                    groups[name] = "" if value is None else str(value)
    return groups


def _options(group: str) -> list[str]:
    return sorted(
        p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_")
    )


def _group_schema(group: str, option: str) -> type | None:
    """The schema an option of a train group starts from (via its YAML's defaults list)."""
    if group == "trainer":
        return TrainerConf
    if group == "dataset" and option in ("", "???"):
        return DatasetConf
    path = Path(CONFIG_DIR) / group / f"{option}.yaml"
    if not path.is_file():
        return None
    for entry in OmegaConf.load(path).get("defaults", []):
        source = str(entry).split("@")[0]
        if source.startswith("/schema/"):
            _, _, schema_group, name = source.split("/")
            for found_group, found_name, node in group_schemas():
                if (found_group, found_name) == (schema_group, name):
                    return node if isinstance(node, type) else type(node)
    return None


def _option_values(group: str, option: str) -> dict[str, Any]:
    """The values an option's YAML file sets itself (over its schema's defaults)."""
    path = Path(CONFIG_DIR) / group / f"{option}.yaml"
    if not option or not path.is_file():
        return {}
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults", None)
    return values


def _main_keys(command: str) -> list[tuple[str, Any, str]]:
    schema = COMMANDS[command]["schema"]
    if command != "train":
        return described(schema)
    groups = _groups("train")
    rows = []
    for group, keys in MAIN_TRAIN_KEYS.items():
        option = groups.get(group, "")
        node = schema if not group else _group_schema(group, option)
        values = _option_values(group, option) if group else {}
        fields = {key: (default, about) for key, default, about in described(node)}
        for key in keys:
            default, about = fields[key]
            rows.append((f"{group}.{key}" if group else key, values.get(key, default), about))
    return rows


def _shown(default: Any) -> str:
    if default is MISSING or default == "???":
        return "???"
    if isinstance(default, Enum):
        default = default.value
    if dataclasses.is_dataclass(default):
        return "{...}"
    return "null" if default is None else str(default)


def _entry(left: str, right: str, column: int) -> list[str]:
    """`left` padded to `column`, then `right` wrapped under itself."""
    start = f"{left:<{column}} " if len(left) < column else f"{left} "
    wrapped = textwrap.wrap(right, WIDTH - len(start)) or [""]
    return [start + wrapped[0], *(" " * len(start) + line for line in wrapped[1:])]


def _key_entry(key: str, default: Any, about: str) -> list[str]:
    """A key, its default and its description (wrapped under the description's column)."""
    return _entry(f"  {key:<34} {_shown(default):<10}", about, 47)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH)

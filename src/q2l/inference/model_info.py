"""What a trained model needs beside its weights, in one JSON-ready record, and threshold files.

`ModelInfo` travels with every export (ONNX metadata_props["q2l"], TorchScript extra file
"q2l.json", the safetensors file's sidecar JSON) so that `q2l-predict` can preprocess, name and
threshold the scores of any of them exactly as it does for the checkpoint.

Per-class thresholds chosen by `eval.py calibrate=f1` live beside the checkpoint as
`<checkpoint stem>.thresholds.json` (`thresholds_path`), with the rule, the split and the
checkpoint's step they were chosen for.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from q2l.models.backbone import normalization
from q2l.utils.atomic import atomic_write
from q2l.utils.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "q2l-model-info"
THRESHOLDS_FORMAT = "q2l-thresholds"
VERSION = 1
# How images become the model's input; the exported graphs start after this step.
PREPROCESSING = (
    "RGB (EXIF orientation applied), resized to image_size x image_size (bilinear, antialiased, "
    "aspect ratio not kept), scaled to [0, 1], normalised with mean/std; NCHW float32"
)


@dataclass
class ModelInfo:
    """Everything besides the weights that turns images into named, thresholded predictions.

    thresholds: per-class thresholds (K floats) when calibrated, else None: `threshold` applies.
    model_config: the `backbone`, `model` and `dataset.image_size` entries of the run's config,
        enough to rebuild the module (q2l.training.build.build_model, allowlisted).
    """

    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    threshold: float
    model_config: dict[str, Any]
    thresholds: list[float] | None = None
    thresholds_source: dict[str, Any] | None = None
    weights: str = "raw"
    epoch: int | None = None
    step: int | None = None
    input_name: str = "images"
    output_name: str = "logits"  # apply the sigmoid for probabilities
    preprocessing: str = PREPROCESSING
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict[str, Any], weights: str, image_size: int | None = None
    ) -> ModelInfo:
        """The record of `checkpoint` with `weights` ("raw"/"ema") and no thresholds yet."""
        config = checkpoint["config"]
        size = int(image_size or config["dataset"]["image_size"])
        backbone_config = config["backbone"]
        mean, std = normalization(
            backbone_config["name"], backbone_config.get("normalization", "pretrained")
        )
        backbone = {**config["backbone"], "weights": None}  # a local path; not needed to rebuild
        backbone.pop("prepare", None)
        return cls(
            class_names=[str(name) for name in checkpoint["class_names"]],
            image_size=size,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            threshold=float(config["trainer"]["threshold"]),
            model_config={
                "backbone": backbone,
                "model": dict(config["model"]),
                "dataset": {"image_size": size},
            },
            weights=weights,
            epoch=checkpoint.get("epoch"),
            step=checkpoint.get("step"),
        )

    def with_thresholds(self, record: dict[str, Any] | None) -> ModelInfo:
        """A copy using the per-class thresholds of a thresholds-file `record` (None: none)."""
        if record is None:
            return ModelInfo(**{**asdict(self), "thresholds": None, "thresholds_source": None})
        check_classes(record["classes"], self.class_names, record.get("path", "thresholds file"))
        keys = ("rule_name", "rule", "split", "checkpoint_step", "path")
        source = {k: record[k] for k in keys if k in record}
        return ModelInfo(
            **{
                **asdict(self),
                "thresholds": [float(t) for t in record["thresholds"]],
                "thresholds_source": source,
            }
        )

    def class_thresholds(self) -> list[float]:
        """K thresholds: the calibrated ones, or the run's threshold for every class."""
        return self.thresholds or [self.threshold] * len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> ModelInfo:
        """Parse a record written by `to_json`; `source` names the file in errors."""
        try:
            record = json.loads(text)
        except ValueError as error:
            raise InputError(f"{source}: the q2l model record is not JSON ({error})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise InputError(f"{source} carries no q2l model record (format {FORMAT!r})")
        if record.get("version", 0) > VERSION:
            raise InputError(
                f"{source}: model record version {record['version']} is newer than "
                f"this q2l understands ({VERSION}); upgrade q2l"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in record.items() if k in known})


def check_classes(
    found: list[str],
    expected: list[str],
    source: str,
    *,
    mismatch: str | None = None,
    found_in: str = "file",
    expected_in: str = "model",
) -> None:
    """Raise ValueError when the class list `found` (read from `source`) differs from `expected`.

    The message is `mismatch` (default: "<source>: its classes do not match the model's") and
    the difference: "only in <expected_in>: [...]; only in <found_in>: [...]" (the first ten
    names of each) or "same names, other order".
    """
    if list(found) == list(expected):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    detail = (
        f"only in {expected_in}: {_first_names(missing)}; only in {found_in}: {_first_names(extra)}"
        if missing or extra
        else "same names, other order"
    )
    if mismatch is None:
        mismatch = f"{source}: its classes do not match the model's"
    raise InputError(f"{mismatch} ({detail})")


def _first_names(names: list[str], shown: int = 10) -> str:
    more = len(names) - shown
    return f"{names[:shown]}" + (f" and {more} more" if more > 0 else "")


def thresholds_path(checkpoint: str | Path) -> Path:
    """Where calibrated thresholds of `checkpoint` live: beside it, `<stem>.thresholds.json`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.thresholds.json")


def write_thresholds(path: Path, record: dict[str, Any]) -> None:
    """Write a thresholds `record` to `path`, which must not exist (earlier ones are kept)."""
    if path.exists():
        raise FileExistsError(f"{path} exists; q2l does not overwrite thresholds")
    with atomic_write(path, "w") as handle:
        json.dump({"format": THRESHOLDS_FORMAT, "version": VERSION, **record}, handle, indent=1)
    log.info("wrote per-class thresholds to %s", path)


def read_thresholds(path: str | Path) -> dict[str, Any]:
    """A thresholds file's record (with its `path`); clear errors naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read thresholds file {path}: {error}") from None
    if not isinstance(record, dict) or record.get("format") != THRESHOLDS_FORMAT:
        raise InputError(f"{path} is not a q2l thresholds file (format {THRESHOLDS_FORMAT!r})")
    thresholds = record.get("thresholds")
    if (
        not isinstance(thresholds, list)
        or len(thresholds) != len(record.get("classes", []))
        or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in thresholds)
    ):
        raise InputError(f"{path}: thresholds must be one finite number per class")
    return {**record, "path": str(path)}


def choose_thresholds(info: ModelInfo, option: str, ckpt: str | None) -> tuple[ModelInfo, str]:
    """`info` with the thresholds `option` selects, and a sentence saying which they are.

    option: "auto" (the calibrated thresholds beside `ckpt`, else those embedded in an export,
    else the run's threshold), "run" (the run's trainer.threshold for every class) or the path of
    a thresholds file.
    """
    if option == "run":
        return info.with_thresholds(None), _run_threshold_note(info, "thresholds=run")
    if option != "auto":
        record = read_thresholds(option)
        return _checked(info.with_thresholds(record), record), _file_note(record)
    beside = thresholds_path(ckpt) if ckpt else None
    if beside is not None and beside.is_file():
        record = read_thresholds(beside)
        return _checked(info.with_thresholds(record), record), _file_note(record)
    if info.thresholds is not None:
        source = info.thresholds_source or {}
        return info, (
            f"per-class thresholds embedded in the model file (rule "
            f"{source.get('rule_name', 'calibrated')}, chosen on "
            f"{source.get('split', {}).get('dataset', 'an evaluated split')})"
        )
    return info, _run_threshold_note(info, "no calibrated thresholds found")


def _checked(info: ModelInfo, record: dict[str, Any]) -> ModelInfo:
    step = record.get("checkpoint_step")
    if info.step is not None and step is not None and step != info.step:
        log.warning(
            "%s was calibrated for the checkpoint at step %s, but this one is at step %s "
            "(the checkpoint changed since): recalibrate with eval.py ... calibrate=f1",
            record["path"],
            step,
            info.step,
        )
    return info


def _file_note(record: dict[str, Any]) -> str:
    split = record.get("split", {})
    return (
        f"per-class thresholds from {record['path']} (rule {record.get('rule_name', 'f1')}, "
        f"chosen on {split.get('dataset', '?')}, {split.get('num_images', '?')} images)"
    )


def _run_threshold_note(info: ModelInfo, why: str) -> str:
    return f"{why}: the run's trainer.threshold={info.threshold} for every class"

"""Check a built (train, val) pair before training: files, duplicates, overlap, empty classes.

    q2l-validate-data dataset=voc2007 dataset.root=/data/VOCdevkit
    q2l-validate-data dataset=table dataset.root=/data/kitchen dataset.validate=full

`validate_splits` looks at every image file (its header by default, a full decode with
level="full"), and at the label matrices, and returns a `DataReport` of counts; if anything is
wrong it raises one `DataValidationError` listing every problem, not the first. Problems: missing
or unreadable files, an image listed twice in a split, an image in both splits, splits with
different classes, an empty split, a split without a single positive label (`without_positives`:
nothing to learn from, or no AP to measure). A class without positives in a split is a warning:
its AP is undefined, and mAP leaves it out.

Annotation-level problems (unknown categories, file names that are absolute or contain '..',
broken annotation files) are found earlier, when the format reader builds the split; the command
line tool reports those too. Training runs the header check at start (dataset.validate=quick).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from q2l.data.dataset import BadImageError, MultiLabelImageDataset, load_rgb, open_image
from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

log = logging.getLogger(__name__)

LEVELS = ("quick", "full")
# File checks wait on storage more than on the CPU; PIL also releases the GIL while decoding.
_THREADS = min(32, 4 * (os.cpu_count() or 1))


class DataValidationError(InputError):
    """Every problem found, one per line; `report` holds the counts."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        super().__init__(
            f"{len(report.problems)} data problem(s):\n  - " + "\n  - ".join(report.problems)
        )


@dataclass
class SplitReport:
    """What one split holds and what is wrong with its files."""

    images: int
    classes: int
    positives: int
    negatives: int
    unknown: int
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    duplicated: list[str] = field(default_factory=list)  # ids listed more than once
    classes_without_positives: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    level: str
    splits: dict[str, SplitReport]
    shared_images: list[str]
    problems: list[str]
    warnings: list[str]
    seconds: float

    def counts(self) -> dict[str, int]:
        """Flat numbers for logs and metrics files: train_images, val_missing, shared_images, ..."""
        counts = {
            "shared_images": len(self.shared_images),
            "problems": len(self.problems),
            "warnings": len(self.warnings),
        }
        for name, split in self.splits.items():
            for key in ("images", "classes", "positives", "negatives", "unknown"):
                counts[f"{name}_{key}"] = getattr(split, key)
            for key in ("missing", "unreadable", "duplicated", "classes_without_positives"):
                counts[f"{name}_{key}"] = len(getattr(split, key))
        return counts

    def format(self) -> str:
        """A fixed-width table of the counts, then the warnings and problems."""
        columns = [
            "images",
            "classes",
            "positives",
            "negatives",
            "unknown",
            "missing",
            "unreadable",
            "duplicated",
            "no-positive classes",
        ]
        widths = [max(len(column), 9) + 2 for column in columns]
        lines = [
            f"{'split':<7}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
        ]
        for name, split in self.splits.items():
            values = [
                split.images,
                split.classes,
                split.positives,
                split.negatives,
                split.unknown,
                len(split.missing),
                len(split.unreadable),
                len(split.duplicated),
                len(split.classes_without_positives),
            ]
            lines.append(
                f"{name:<7}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
            )
        lines.append(
            f"images in both splits: {len(self.shared_images)}   (checked: {self.level}, "
            f"{self.seconds:.1f} s)"
        )
        lines += [f"warning: {text}" for text in self.warnings]
        lines += [f"PROBLEM: {text}" for text in self.problems] or ["no problems found"]
        return "\n".join(lines)


def validate_splits(
    train: MultiLabelImageDataset,
    val: MultiLabelImageDataset,
    level: str = "quick",
    bad_image_tolerance: float | None = None,
) -> DataReport:
    """Check both splits; return the report, or raise DataValidationError listing every problem.

    Args:
        level: "quick" opens each file and checks its header (PIL open + verify); "full" decodes
            every image completely, as training will (finds truncated files; much slower).
        bad_image_tolerance: None: every missing or unreadable file is a problem. A fraction: up to
            that share of a split may be bad (on_bad_image=skip); they become warnings.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    start = time.perf_counter()
    problems: list[str] = []
    warnings: list[str] = []
    if train.class_names != val.class_names:
        only_train = [c for c in train.class_names if c not in val.class_names]
        only_val = [c for c in val.class_names if c not in train.class_names]
        detail = (
            f"only in train: {only_train}; only in val: {only_val}"
            if only_train or only_val
            else "same names, other order"
        )
        problems.append(f"train and val have different classes ({detail})")
    splits = {}
    for name, dataset in (("train", train), ("val", val)):
        split = _check_split(dataset, level)
        splits[name] = split
        _judge_split(name, split, bad_image_tolerance, problems, warnings)
    shared = _shared_images(train.image_paths, val.image_paths)
    if shared:
        problems.append(
            f"{len(shared)} image(s) in both train and val (val would measure memory): "
            f"{and_more(shared)}"
        )
    report = DataReport(level, splits, shared, problems, warnings, time.perf_counter() - start)
    if problems:
        raise DataValidationError(report)
    return report


def _check_split(dataset: MultiLabelImageDataset, level: str) -> SplitReport:
    labels = dataset.labels
    split = SplitReport(
        images=len(dataset),
        classes=dataset.num_classes,
        positives=int((labels == 1).sum()),
        negatives=int((labels == 0).sum()),
        unknown=int((labels == -1).sum()),
        duplicated=_duplicated(dataset.image_ids)
        or _duplicated([os.path.normpath(p) for p in dataset.image_paths]),
        classes_without_positives=[
            name
            for name, has in zip(dataset.class_names, (labels == 1).any(axis=0), strict=True)
            if not has
        ],
    )
    limit = getattr(dataset, "max_image_pixels", None)
    with ThreadPoolExecutor(_THREADS) as pool:
        outcomes = pool.map(lambda path: _check_file(path, level, limit), dataset.image_paths)
        for path, outcome in zip(dataset.image_paths, outcomes, strict=True):
            if outcome == "missing":
                split.missing.append(str(path))
            elif outcome is not None:
                split.unreadable.append(f"{path}: {outcome}")
    return split


def _check_file(path: Path, level: str, max_pixels: int | None) -> str | None:
    """None if the file reads, "missing", or the decoder's reason (or that the image is larger
    than `max_pixels`, the data set's max_image_pixels)."""
    try:
        if level == "full":
            load_rgb(path, max_pixels=max_pixels)
        else:
            with open_image(path, max_pixels) as image:
                image.verify()
        return None
    except FileNotFoundError:
        return "missing"
    except BadImageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return "missing"
        # A decoder's reason already follows the path in the report; the size limit's is whole.
        return str(error.__cause__) if error.__cause__ is not None else str(error)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__


def _judge_split(
    name: str, split: SplitReport, tolerance: float | None, problems: list[str], warnings: list[str]
) -> None:
    """Sort one split's findings into problems and warnings."""
    if split.images == 0:
        problems.append(f"{name}: no images")
    elif split.positives == 0:
        problems.append(without_positives(name, split.images, split.unknown))
    bad = len(split.missing) + len(split.unreadable)
    tolerated = tolerance is not None and bad <= tolerance * max(split.images, 1)
    sink = warnings if tolerated else problems
    suffix = f" (tolerated: on_bad_image=skip, max_bad_fraction={tolerance})" if tolerated else ""
    if split.missing:
        sink.append(
            f"{name}: {len(split.missing)} missing image file(s){suffix}: {and_more(split.missing)}"
        )
    if split.unreadable:
        sink.append(
            f"{name}: {len(split.unreadable)} unreadable image file(s){suffix}: "
            f"{and_more(split.unreadable)}"
        )
    if split.duplicated:
        problems.append(
            f"{name}: {len(split.duplicated)} image(s) listed more than once: "
            f"{and_more(split.duplicated)}"
        )
    if split.classes_without_positives:
        warnings.append(
            f"{name}: {len(split.classes_without_positives)} class(es) without a positive "
            f"(their AP is undefined): {and_more(split.classes_without_positives)}"
        )


def without_positives(split: str, images: int, unknown: int) -> str:
    """The problem of a split of `images` images in which no image has a single positive label
    (`unknown` of its entries are -1): the message training refuses with, and validation lists."""
    kind = "unknown (-1) or negative" if unknown else "negative"
    return (
        f"{split}: not one positive label in its {images} images (every entry is {kind}), so "
        f"{'there is nothing to learn' if split == 'train' else 'no AP or mAP can be measured'}. "
        "Check that the annotation files are the ones meant for these images and that they "
        "name the images' classes (dataset.root, the annotation options of dataset=...); "
        "`q2l-validate-data dataset=...` prints each split's counts"
    )


def _duplicated(values: Sequence[Any]) -> list[str]:
    return [str(value) for value, count in collections.Counter(values).items() if count > 1]


def _shared_images(train_paths: Sequence[Path], val_paths: Sequence[Path]) -> list[str]:
    """Files both splits read, compared after resolving symlinks and '.' parts."""
    resolved_train = {os.path.realpath(p) for p in train_paths}
    return sorted({str(p) for p in val_paths if os.path.realpath(p) in resolved_train})

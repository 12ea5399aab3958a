"""Open Images image-level labels: a CSV of (ImageID, LabelName, Confidence) rows, partly annotated.

    ImageID,Source,LabelName,Confidence
    000002b66c9c498e,verification,/m/014j1m,0
    000002b66c9c498e,crowdsource-verification,/m/014sv8,1

Confidence 1 is a human-verified positive (target 1), 0 a verified negative (0); every other
(image, class) pair, including machine-generated labels with fractional confidence, is unknown
(-1), which is what the partial-label loss expects. Columns are found by their header names. The
image of ImageID is `image_dir/<ImageID><image_extension>`.

Classes: `class_file` (Open Images' class-descriptions CSV of "LabelName,DisplayName" rows, with
or without the header, or one LabelName per line), else every LabelName in the `classes_from`
files (default: this split's own file; give both splits' files so train and val agree). With a
descriptions file the class names are the display names, made unique with the LabelName where two
classes share one. Label rows of classes outside the list are dropped (unknown_labels="ignore",
the usual way of training on a subset such as the 600 boxable classes) or refused ("error").

Labels are held densely, N×K bytes: fine for subsets, about 1 GB for the full 1.7 M images × 600
boxable classes.
"""

from __future__ import annotations

import collections
import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.label_lists import UNKNOWN_LABEL_POLICIES, check_class_names
from q2l.data.paths import confine_all
from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

_REQUIRED_COLUMNS = ("ImageID", "LabelName", "Confidence")
_DESCRIPTIONS_HEADER = ("LabelName", "DisplayName")


class OpenImagesMultiLabel(MultiLabelImageDataset):
    """One split of Open Images' image-level labels (see the module docstring).

    Args:
        image_dir: folder holding `<ImageID><image_extension>` files.
        annotation_file: the split's human image-labels CSV.
        class_file: class descriptions CSV or list; None collects the labels of `classes_from`.
        classes_from: annotation files whose LabelNames make the class list when class_file is
            None; default [annotation_file].
        unknown_labels: rows naming a class outside class_file: "ignore" or "error".
        image_extension: file name suffix of the images.
        transform: PIL image -> tensor.
        options: decoding options of `MultiLabelImageDataset` (on_bad_image, max_bad_fraction,
            max_image_pixels).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        class_file: str | Path | None = None,
        classes_from: Sequence[str | Path] | None = None,
        unknown_labels: str = "ignore",
        image_extension: str = ".jpg",
        transform: Callable | None = None,
        **options: Any,
    ) -> None:
        if unknown_labels not in UNKNOWN_LABEL_POLICIES:
            raise InputError(
                f"unknown_labels must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown_labels!r}"
            )
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Open Images image folder not found: {image_dir}")
        rows = read_image_labels(annotation_file)
        if class_file is not None:
            label_names, class_names = read_class_descriptions(class_file)
        else:
            sources = [Path(p) for p in classes_from] if classes_from else [Path(annotation_file)]
            label_names = sorted(
                {
                    label
                    for source in sources
                    for _, label, _ in (
                        rows if source == Path(annotation_file) else read_image_labels(source)
                    )
                }
            )
            class_names = label_names
            check_class_names(class_names, annotation_file)
        image_ids, labels = _label_matrix(rows, label_names, annotation_file, unknown_labels)
        paths = confine_all(
            image_dir, [f"{image_id}{image_extension}" for image_id in image_ids], annotation_file
        )
        super().__init__(paths, labels, class_names, transform, image_ids=image_ids, **options)


def read_image_labels(annotation_file: str | Path) -> list[tuple[str, str, float]]:
    """(ImageID, LabelName, Confidence) per row of an image-labels CSV."""
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"Open Images annotation file not found: {annotation_file}")
    with annotation_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        missing = [name for name in _REQUIRED_COLUMNS if name not in header]
        if missing:
            raise InputError(f"{annotation_file}: no column {missing} in the header {header}")
        image, label, confidence = (header.index(name) for name in _REQUIRED_COLUMNS)
        rows = []
        for record in reader:
            if not record:
                continue
            try:
                rows.append((record[image], record[label], float(record[confidence])))
            except (IndexError, ValueError) as error:
                raise InputError(
                    f"{annotation_file}:{reader.line_num}: bad row {record} ({error})"
                ) from error
    return rows


def read_class_descriptions(class_file: str | Path) -> tuple[list[str], list[str]]:
    """(LabelNames, class names) from a descriptions CSV ("MID,Display name") or a list of MIDs."""
    class_file = Path(class_file)
    if not class_file.is_file():
        raise FileNotFoundError(f"Open Images class file not found: {class_file}")
    with class_file.open(newline="", encoding="utf-8-sig") as handle:
        records = [record for record in csv.reader(handle) if record and record[0].strip()]
    if records and tuple(records[0][:2]) == _DESCRIPTIONS_HEADER:
        records = records[1:]
    label_names = [record[0].strip() for record in records]
    check_class_names(label_names, class_file)
    if not all(len(record) >= 2 and record[1].strip() for record in records):
        return label_names, label_names
    display = [record[1].strip() for record in records]
    shared = {name for name, count in collections.Counter(display).items() if count > 1}
    class_names = [
        f"{name} ({mid})" if name in shared else name
        for name, mid in zip(display, label_names, strict=True)
    ]
    return label_names, class_names


def _label_matrix(
    rows: list[tuple[str, str, float]],
    label_names: list[str],
    source: str | Path,
    unknown_labels: str,
) -> tuple[list[str], np.ndarray]:
    """(image ids in first-seen order, (N, K) int8): 1 where confidence is 1, 0 where 0, else -1."""
    column = {name: index for index, name in enumerate(label_names)}
    row_of: dict[str, int] = {}
    strangers: collections.Counter[str] = collections.Counter()
    entries = []
    for image_id, label, confidence in rows:
        index = row_of.setdefault(image_id, len(row_of))
        if label not in column:
            strangers[label] += 1
            continue
        value = 1 if confidence == 1.0 else 0 if confidence == 0.0 else -1
        entries.append((index, column[label], value))
    if strangers and unknown_labels == "error":
        shown = and_more(f"{name!r}: {count}" for name, count in strangers.most_common())
        raise InputError(
            f"{source}: {len(strangers)} LabelName(s) not in the class list (name: rows): {shown}"
        )
    labels = np.full((len(row_of), len(label_names)), -1, dtype=np.int8)
    if entries:
        index, col, value = (np.array(part) for part in zip(*entries, strict=True))
        # Of several rows for one (image, class) the strongest wins: positive over negative over
        # unknown.
        np.maximum.at(labels, (index, col), value.astype(np.int8))
    return list(row_of), labels

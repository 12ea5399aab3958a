"""Your own data: a CSV or JSON table of image file names and label names.

    image,labels,unknown
    kitchen/0001.jpg,cup|knife,
    kitchen/0002.jpg,cup,spoon

One row (record) per image: the file name relative to `image_root` (column `image`), the labels
present, joined by `label_delimiter` (column `labels`), and optionally labels whose status is
unknown (column `unknown`, target -1) and labels verified absent (column `negatives`, target 0).
Every class a row does not mention is absent, or unknown with unlisted="unknown" (data annotated
only partly, as Open Images is). Column names are arguments.

Files: .csv (comma-separated) or .tsv (tab-separated) with a header row; .json holding a list of
records or {"classes": [...], "images": [...]}; .jsonl with one record per line. In JSON a label
field is a list of names or one delimited string.

Splits: separate files (`train_file`, `val_file`), or, with val_file None, `val_fraction` of the
distinct images of `train_file` held out by a permutation seeded with `split_seed`. Classes:
`class_file` (one name per line, in that order), else the JSON's "classes", else the sorted union
of every label name in both splits, so the train and val splits always agree on the columns.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.label_lists import (
    ImageLabels,
    check_class_names,
    label_matrix,
    names_seen,
    read_class_file,
    split_names,
)
from q2l.data.paths import confine_all

_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_SUFFIXES = (*_CSV_DELIMITERS, ".json", ".jsonl")


class TableRow(NamedTuple):
    file_name: str
    labels: ImageLabels


class TableMultiLabel(MultiLabelImageDataset):
    """One split of a CSV/JSON image table (see the module docstring for the layout).

    Args:
        image_root: folder the table's file names are relative to.
        train_file: table of the training images (or of all images, with val_file None).
        split: "train" or "val".
        val_file: table of the validation images; None holds out `val_fraction` of train_file.
        val_fraction: share of train_file's distinct images held out for val, in (0, 1).
        split_seed: seed of the hold-out permutation.
        class_file: class names, one per line; None takes them from the data.
        image_column, labels_column, unknown_column, negatives_column: column (field) names; the
            last two are optional in the files.
        label_delimiter: separator of label names inside one cell.
        unlisted: what a class a row does not mention is: "negative" (0) or "unknown" (-1).
        unknown_labels: label names outside class_file: "error" or "ignore".
        transform: PIL image -> tensor.
        options: decoding options of `MultiLabelImageDataset` (on_bad_image, max_bad_fraction,
            max_image_pixels).
    """

    def __init__(
        self,
        image_root: str | Path,
        train_file: str | Path,
        split: str = "train",
        val_file: str | Path | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        class_file: str | Path | None = None,
        image_column: str = "image",
        labels_column: str = "labels",
        unknown_column: str = "unknown",
        negatives_column: str = "negatives",
        label_delimiter: str = "|",
        unlisted: str = "negative",
        unknown_labels: str = "error",
        transform: Callable | None = None,
        **options: Any,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        image_root = Path(image_root)
        if not image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_root}")
        columns = {
            "image": image_column,
            "labels": labels_column,
            "unknown": unknown_column,
            "negatives": negatives_column,
        }
        train_rows, listed_classes = read_table(train_file, columns, label_delimiter)
        if val_file is not None:
            val_rows, val_classes = read_table(val_file, columns, label_delimiter)
            if (
                listed_classes is not None
                and val_classes is not None
                and val_classes != listed_classes
            ):
                raise ValueError(f"{train_file} and {val_file} list different classes")
            listed_classes = listed_classes or val_classes
        else:
            train_rows, val_rows = hold_out(train_rows, val_fraction, split_seed)
        if class_file is not None:
            class_names = read_class_file(class_file)
        elif listed_classes is not None:
            class_names = listed_classes
        else:
            class_names = names_seen(row.labels for row in train_rows + val_rows)
            check_class_names(class_names, train_file)
        rows = train_rows if split == "train" else val_rows
        source = Path(val_file) if split == "val" and val_file is not None else Path(train_file)
        file_names = [row.file_name for row in rows]
        paths = confine_all(image_root, file_names, source)
        labels = label_matrix(
            [row.labels for row in rows],
            class_names,
            source,
            unlisted=unlisted,
            unknown_labels=unknown_labels,
        )
        super().__init__(paths, labels, class_names, transform, image_ids=file_names, **options)


def read_table(
    path: str | Path, columns: dict[str, str], delimiter: str
) -> tuple[list[TableRow], list[str] | None]:
    """Rows of a CSV/TSV/JSON/JSONL table, and the class list a JSON file may carry (else None).

    `columns` maps the roles image, labels, unknown, negatives to the file's column names.
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported table type {path.suffix!r}; use one of {_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"table file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _CSV_DELIMITERS:
        return _read_csv(path, columns, delimiter, _CSV_DELIMITERS[suffix]), None
    return _read_json(path, columns, delimiter)


def hold_out(
    rows: list[TableRow], fraction: float, seed: int
) -> tuple[list[TableRow], list[TableRow]]:
    """(train rows, val rows): `fraction` of the distinct file names go to val, chosen by `seed`.

    Rows naming the same file stay together, so a duplicated row cannot land in both splits.
    Both keep the table's order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1) when no val_file is given, got {fraction}"
        )
    names = list(dict.fromkeys(row.file_name for row in rows))
    num_val = round(fraction * len(names))
    if not 0 < num_val < len(names):
        raise ValueError(f"val_fraction={fraction} of {len(names)} images leaves a split empty")
    order = np.random.default_rng(seed).permutation(len(names))
    val_names = {names[i] for i in order[:num_val]}
    return [r for r in rows if r.file_name not in val_names], [
        r for r in rows if r.file_name in val_names
    ]


def _read_csv(
    path: Path, columns: dict[str, str], delimiter: str, separator: str
) -> list[TableRow]:
    # utf-8-sig: tables saved by spreadsheet programs start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        header = reader.fieldnames or []
        missing = [columns[role] for role in ("image", "labels") if columns[role] not in header]
        if missing:
            raise ValueError(f"{path}: no column {missing} in the header {header}")
        rows = []
        for record in reader:
            rows.append(_row(record, columns, delimiter, f"{path}:{reader.line_num}"))
    return rows


def _read_json(
    path: Path, columns: dict[str, str], delimiter: str
) -> tuple[list[TableRow], list[str] | None]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            classes = None
        else:
            content = json.loads(text)
            records = content.get("images") if isinstance(content, dict) else content
            classes = content.get("classes") if isinstance(content, dict) else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of image records or {{'images': [...]}}")
    if classes is not None:
        classes = [str(name) for name in classes]
        check_class_names(classes, path)
    rows = []
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number} is not an object")
        rows.append(_row(record, columns, delimiter, f"{path}: record {number}"))
    return rows, classes


def _row(record: dict[str, Any], columns: dict[str, str], delimiter: str, where: str) -> TableRow:
    file_name = record.get(columns["image"])
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError(f"{where}: no image file name in {columns['image']!r}")
    labels = ImageLabels(
        positives=split_names(record.get(columns["labels"]), delimiter),
        negatives=split_names(record.get(columns["negatives"]), delimiter),
        unknown=split_names(record.get(columns["unknown"]), delimiter),
    )
    return TableRow(file_name.strip(), labels)

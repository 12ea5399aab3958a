"""NUS-WIDE as ASL and ML-Decoder distribute it: one CSV of (image path, label list, split).

    filepath,label,split
    images/0001_2124494179.jpg,"['clouds', 'sky']",train
    images/0002_174174086.jpg,[],val

The first row is a header (both reference loaders read the file with pandas' defaults); columns are
taken by position: image path relative to the image root, the labels as a Python-style list (quotes
optional), and the split name ("train" or "val"). The 81 concepts come from `class_file` (one per
line, e.g. the data set's Concepts81.txt) or, without one, from the sorted set of labels in the
whole CSV, which is the class order ASL/ML-Decoder train with. Images listing no concept are
all-negative rows.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.label_lists import (
    ImageLabels,
    check_class_names,
    label_matrix,
    names_seen,
    read_class_file,
)
from q2l.data.paths import confine_all
from q2l.utils.errors import InputError


class NusWideMultiLabel(MultiLabelImageDataset):
    """One split of the NUS-WIDE CSV.

    Args:
        image_root: folder the CSV's image paths are relative to.
        csv_file: the (path, label list, split) CSV.
        split: split name as the CSV's third column spells it ("train" or "val").
        class_file: concept names, one per line; None takes the sorted labels of the whole CSV.
        unknown_labels: labels outside class_file: "error", or "ignore" (e.g. the 1,006-tag
            zero-shot CSV read with the 81-concept list).
        transform: PIL image -> tensor.
        options: decoding options of `MultiLabelImageDataset` (on_bad_image, max_bad_fraction,
            max_image_pixels).
    """

    def __init__(
        self,
        image_root: str | Path,
        csv_file: str | Path,
        split: str,
        class_file: str | Path | None = None,
        unknown_labels: str = "error",
        transform: Callable | None = None,
        **options: Any,
    ) -> None:
        image_root = Path(image_root)
        if not image_root.is_dir():
            raise FileNotFoundError(f"NUS-WIDE image folder not found: {image_root}")
        rows = read_nus_wide_csv(csv_file)
        splits = sorted({row_split for _, _, row_split in rows})
        if split not in splits:
            raise InputError(
                f"{csv_file}: no image in split {split!r}; the CSV has splits {splits}"
            )
        if class_file is not None:
            class_names = read_class_file(class_file)
        else:
            class_names = names_seen(labels for _, labels, _ in rows)
            check_class_names(class_names, csv_file)
        chosen = [(name, labels) for name, labels, row_split in rows if row_split == split]
        paths = confine_all(image_root, [name for name, _ in chosen], csv_file)
        labels = label_matrix(
            [labels for _, labels in chosen], class_names, csv_file, unknown_labels=unknown_labels
        )
        super().__init__(
            paths, labels, class_names, transform, image_ids=[name for name, _ in chosen], **options
        )


def read_nus_wide_csv(csv_file: str | Path) -> list[tuple[str, ImageLabels, str]]:
    """(image path, labels, split) per data row of the CSV."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"NUS-WIDE CSV not found: {csv_file}")
    rows = []
    with csv_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # header
        for record in reader:
            if not record:
                continue
            if len(record) < 3 or not record[0].strip():
                raise InputError(
                    f"{csv_file}:{reader.line_num}: expected image path, label list, split; got "
                    f"{record}"
                )
            rows.append(
                (
                    record[0].strip(),
                    ImageLabels(positives=parse_label_list(record[1])),
                    record[2].strip(),
                )
            )
    return rows


def parse_label_list(text: str) -> list[str]:
    """ "['clouds', 'sky']" or "[clouds, sky]" -> ['clouds', 'sky']; "[]" -> []."""
    inner = text.strip().removeprefix("[").removesuffix("]")
    names = [part.strip().strip("'\"").strip() for part in inner.split(",")]
    return [name for name in names if name]

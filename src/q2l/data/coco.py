"""MS-COCO instances annotations (2014 and 2017 layouts) as a multi-label data set (pycocotools).

Class order is the sorted category ids of the annotation file (COCO's ids have gaps), with the names
kept. Parsing a 450 MB annotation file takes a while, so the multi-hot matrix is cached, keyed by
the file's SHA-256: an edited annotation file never meets a stale cache.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.paths import confine_all
from q2l.utils.atomic import atomic_write
from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

log = logging.getLogger(__name__)

_CACHE_VERSION = 2

# The 80 instance categories in category-id order: the class order of CocoMultiLabel and of the
# official Query2Label (for checkpoints brought in without the annotation files: q2l-import).
COCO_CLASSES = (
    *("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    *("traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat"),
    *("dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack"),
    *("umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball"),
    *("kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket"),
    *("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple"),
    *("sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair"),
    *("couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse"),
    *("remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink"),
    *("refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier"),
    "toothbrush",
)


class CocoMultiLabel(MultiLabelImageDataset):
    """COCO `instances_*.json` + image folder as (image, multi-hot target) pairs.

    Args:
        image_dir: folder holding the images the annotation file names.
        annotation_file: COCO instances JSON.
        transform: PIL image -> tensor.
        keep_unannotated: keep images without any annotation as all-negative rows (the official
            Query2Label does; ASL/ML-Decoder drop them, which changes val mAP slightly).
        cache_dir: where the parsed labels are cached; None disables the cache.
        options: decoding options of `MultiLabelImageDataset` (on_bad_image, max_bad_fraction,
            max_image_pixels).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transform: Callable | None = None,
        keep_unannotated: bool = True,
        cache_dir: str | Path | None = None,
        **options: Any,
    ) -> None:
        image_dir = Path(image_dir)
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
        image_ids, file_names, labels, class_names = _read_labels_cached(annotation_file, cache_dir)
        if not keep_unannotated:
            annotated = labels.any(axis=1)
            image_ids = [i for i, keep in zip(image_ids, annotated, strict=True) if keep]
            file_names = [name for name, keep in zip(file_names, annotated, strict=True) if keep]
            labels = labels[annotated]
        paths = confine_all(image_dir, file_names, annotation_file)
        super().__init__(paths, labels, class_names, transform, image_ids=image_ids, **options)


def _read_labels_cached(
    annotation_file: Path, cache_dir: str | Path | None
) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(image ids, file names, (N, K) int8 labels, class names) from the cache or by parsing."""
    digest = hashlib.sha256(annotation_file.read_bytes()).hexdigest()
    cache_file = (
        Path(cache_dir) / f"coco-labels-v{_CACHE_VERSION}-{digest[:32]}.npz" if cache_dir else None
    )
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                # str(): numpy's str_ would make checkpoints unloadable with weights_only=True.
                return (
                    [int(i) for i in cached["image_ids"]],
                    [str(n) for n in cached["file_names"]],
                    cached["labels"],
                    [str(n) for n in cached["class_names"]],
                )
        except (OSError, ValueError, KeyError) as error:
            log.warning("ignoring unreadable label cache %s (%s)", cache_file, error)
    image_ids, file_names, labels, class_names = read_coco_labels(annotation_file)
    if cache_file is not None:
        _write_cache(cache_file, image_ids, file_names, labels, class_names)
    return image_ids, file_names, labels, class_names


def read_coco_labels(annotation_file: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Parse a COCO instances file into (image ids, file names, (N, K) int8 labels, class names).

    Images are in id order; columns follow the sorted category ids. Duplicated image ids,
    annotations naming an unknown category and annotations of unknown images are all listed in one
    ValueError: any of them means the file does not say which image carries which label.
    """
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(annotation_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
        raise InputError(
            f"{annotation_file}: not a valid COCO annotation file ({error})"
        ) from error
    category_ids = sorted(coco.getCatIds())
    if not category_ids:
        raise InputError(f"{annotation_file}: no categories")
    column = {category_id: index for index, category_id in enumerate(category_ids)}
    class_names = [coco.cats[category_id]["name"] for category_id in category_ids]
    image_ids = sorted(coco.getImgIds())
    row = {image_id: index for index, image_id in enumerate(image_ids)}
    labels = np.zeros((len(image_ids), len(category_ids)), dtype=np.int8)
    unknown_categories: dict[Any, int] = collections.Counter()
    unknown_images: dict[Any, int] = collections.Counter()
    for annotation in coco.dataset.get("annotations", []):
        category_id, image_id = annotation["category_id"], annotation["image_id"]
        if category_id not in column:
            unknown_categories[category_id] += 1
        elif image_id not in row:
            unknown_images[image_id] += 1
        else:
            labels[row[image_id], column[category_id]] = 1
    listed = collections.Counter(image["id"] for image in coco.dataset.get("images", []))
    duplicated = {image_id: count for image_id, count in listed.items() if count > 1}
    problems = [
        f"{what}: {and_more(f'{key}: {count}' for key, count in counts.items())}"
        for what, counts in [
            ("image ids listed more than once (id: times)", duplicated),
            ("annotations naming unknown category ids (id: annotations)", unknown_categories),
            ("annotations of image ids not in 'images' (id: annotations)", unknown_images),
        ]
        if counts
    ]
    if problems:
        raise InputError(f"{annotation_file}: " + "; ".join(problems))
    file_names = [coco.imgs[image_id]["file_name"] for image_id in image_ids]
    return [str(i) for i in image_ids], file_names, labels, class_names


def _write_cache(
    cache_file: Path,
    image_ids: list[str],
    file_names: list[str],
    labels: np.ndarray,
    class_names: list[str],
) -> None:
    """Write the cache atomically; an unwritable cache folder only costs the next start time."""
    try:
        with atomic_write(cache_file) as handle:
            np.savez(
                handle,
                image_ids=np.array(image_ids),
                file_names=np.array(file_names),
                labels=labels,
                class_names=np.array(class_names),
            )
    except OSError as error:
        log.warning("could not write label cache %s (%s)", cache_file, error)

"""Data sets, transforms and loaders.

A checkpoint's config is file input: `DATASETS` lists the readers that may be rebuilt from one
(q2l.training.build.instantiate_allowed), so no other `_target_` read from a file is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from q2l.data.coco import CocoMultiLabel
from q2l.data.dataset import BadImageError, MultiLabelImageDataset
from q2l.data.nus_wide import NusWideMultiLabel
from q2l.data.openimages import OpenImagesMultiLabel
from q2l.data.table import TableMultiLabel
from q2l.data.voc import VocMultiLabel

DATASETS: dict[str, Callable[..., MultiLabelImageDataset]] = {
    "q2l.data.coco.CocoMultiLabel": CocoMultiLabel,
    "q2l.data.voc.VocMultiLabel": VocMultiLabel,
    "q2l.data.nus_wide.NusWideMultiLabel": NusWideMultiLabel,
    "q2l.data.openimages.OpenImagesMultiLabel": OpenImagesMultiLabel,
    "q2l.data.table.TableMultiLabel": TableMultiLabel,
}


__all__ = [
    "BadImageError",
    "CocoMultiLabel",
    "DATASETS",
    "MultiLabelImageDataset",
    "NusWideMultiLabel",
    "OpenImagesMultiLabel",
    "TableMultiLabel",
    "VocMultiLabel",
]

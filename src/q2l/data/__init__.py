"""Data sets, transforms and loaders.

`build_from_checkpoint_config` rebuilds a split from a config stored in a checkpoint. Such a config is file input, so its `_target_` is looked up in the allowlists below
instead of being imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def build_from_checkpoint_config(node: dict[str, Any], allowed: dict[str, Callable], **runtime: Any) -> Any:
    """Call the allowlisted `node["_target_"]` with the node's other keys plus `runtime` ones."""
    arguments = {k: v for k, v in node.items() if not k.startswith("_")}
    target = node.get("_target_")
    if target not in allowed:
        raise ValueError(
            f"the checkpoint's config names {target!r}, which q2l does not rebuild from a file; "
            f"known: {sorted(allowed)}. Pass the data set explicitly (dataset=... on the command line)."
        )
    return allowed[target](**arguments, **runtime)


__all__ = [
    "BadImageError",
    "CocoMultiLabel",
    "DATASETS",
    "MultiLabelImageDataset",
    "NusWideMultiLabel",
    "OpenImagesMultiLabel",
    "TableMultiLabel",
    "VocMultiLabel",
    "build_from_checkpoint_config",
]

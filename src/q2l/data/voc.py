"""Pascal VOC 2007 / 2012 in the VOCdevkit layout, read as a multi-label data set.

    VOCdevkit/VOC2007/
      Annotations/<id>.xml   # one <object><name>..</name><difficult>0|1</difficult> per object
      ImageSets/Main/<image_set>.txt  # one image id per line: train, val, trainval, test
      JPEGImages/<id>.jpg

The 20 classes are VOC's, in VOC's order. An image is positive for a class when at least one object
of that class is not marked difficult. When the class is present only as difficult objects,
`difficult` decides: "ignore" (-1, the target the partial-label losses and mAP then skip; the VOC
evaluation protocol ignores difficult objects too), "positive" (1) or "negative" (0).

The XML is untrusted input: it is parsed with the standard library's expat-based ElementTree,
which never fetches external entities, after an expat pass that refuses any file declaring a DOCTYPE
or an entity (VOC's never do), in whatever encoding, so entity expansion cannot be used against the
loader.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.parsers.expat import ExpatError, ParserCreate

import numpy as np

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.paths import confine_all
from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
DIFFICULT_POLICIES = {"ignore": -1, "positive": 1, "negative": 0}
# VOC annotation files are a few kB; anything this large is not one.
_MAX_XML_BYTES = 1 << 20


class VocMultiLabel(MultiLabelImageDataset):
    """One image set of a VOC year folder (VOCdevkit/VOC2007 or VOCdevkit/VOC2012).

    Args:
        root: the year folder, holding Annotations/, ImageSets/Main/ and JPEGImages/.
        image_set: name of the ImageSets/Main/*.txt list: "trainval", "test", "train" or "val".
        difficult: target of a class present only as difficult objects: "ignore", "positive" or
            "negative".
        transform: PIL image -> tensor.
        options: decoding options of `MultiLabelImageDataset` (on_bad_image, max_bad_fraction,
            max_image_pixels).
    """

    def __init__(
        self,
        root: str | Path,
        image_set: str,
        difficult: str = "ignore",
        transform: Callable | None = None,
        **options: Any,
    ) -> None:
        if difficult not in DIFFICULT_POLICIES:
            raise InputError(
                f"difficult must be one of {sorted(DIFFICULT_POLICIES)}, got {difficult!r}"
            )
        root = Path(root)
        list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC image set list not found: {list_file}")
        image_ids = read_image_set(list_file)
        annotation_files = confine_all(
            root / "Annotations", [f"{i}.xml" for i in image_ids], list_file
        )
        paths = confine_all(root / "JPEGImages", [f"{i}.jpg" for i in image_ids], list_file)
        labels = read_voc_labels(annotation_files, DIFFICULT_POLICIES[difficult])
        super().__init__(paths, labels, VOC_CLASSES, transform, image_ids=image_ids, **options)


def read_image_set(list_file: Path) -> list[str]:
    """Image ids of an ImageSets/Main list; lines may carry a second column (per-class lists)."""
    lines = list_file.read_text(encoding="utf-8").splitlines()
    image_ids = [line.split()[0] for line in lines if line.strip()]
    if not image_ids:
        raise InputError(f"{list_file}: no image ids")
    return image_ids


def read_voc_labels(annotation_files: list[Path], difficult_target: int) -> np.ndarray:
    """(N, 20) int8 targets from N annotation files; every unreadable file is named in one error."""
    column = {name: index for index, name in enumerate(VOC_CLASSES)}
    labels = np.zeros((len(annotation_files), len(VOC_CLASSES)), dtype=np.int8)
    problems: list[str] = []
    for row, annotation_file in enumerate(annotation_files):
        try:
            objects = parse_objects(annotation_file)
        except (OSError, ValueError) as error:
            problems.append(str(error))
            continue
        difficult_only = set()
        for name, difficult in objects:
            if name not in column:
                problems.append(
                    f"{annotation_file}: unknown class {name!r} (VOC has {', '.join(VOC_CLASSES)})"
                )
            elif difficult:
                difficult_only.add(column[name])
            else:
                labels[row, column[name]] = 1
        for index in difficult_only:
            if labels[row, index] != 1:
                labels[row, index] = difficult_target
    if problems:
        raise InputError(
            f"{len(problems)} problem(s) in VOC annotations:\n  "
            + and_more(problems, separator="\n  ")
        )
    return labels


def parse_objects(annotation_file: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every <object> in one VOC annotation file."""
    if not annotation_file.is_file():
        raise FileNotFoundError(f"{annotation_file}: annotation file missing")
    data = annotation_file.read_bytes()
    if len(data) > _MAX_XML_BYTES:
        raise InputError(f"{annotation_file}: {len(data)} bytes, too large for a VOC annotation")
    try:
        _refuse_doctype(data)
        root = ElementTree.fromstring(data)
    except (ElementTree.ParseError, ExpatError) as error:
        raise InputError(f"{annotation_file}: not valid XML ({error})") from error
    except _DoctypeFound:
        raise InputError(
            f"{annotation_file}: DTD or entity declarations are not accepted in annotations"
        ) from None
    objects = []
    for element in root.iter("object"):
        name = (element.findtext("name") or "").strip()
        difficult = (element.findtext("difficult") or "0").strip() not in ("0", "")
        objects.append((name, difficult))
    return objects


class _DoctypeFound(Exception):
    pass


def _refuse_doctype(data: bytes) -> None:
    """Raise _DoctypeFound if the document declares a DTD or an entity, whatever its encoding."""
    parser = ParserCreate()

    def refuse(*_: Any) -> None:
        raise _DoctypeFound

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.Parse(data, True)

"""Every on-disk format, written tiny in its exact layout, read through its conf/dataset option.

Each format is checked for labels and class order, a traversal attempt, a missing and a corrupt
image file, and a train/val overlap; format-specific options get their own tests below.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from q2l.data import DATASETS
from q2l.data.table import TableMultiLabel
from q2l.data.validate import DataValidationError, validate_splits
from q2l.data.voc import VOC_CLASSES, VocMultiLabel
from q2l.training.build import instantiate_allowed

CLASSES = ["cat", "dog", "car"]  # VOC has all three too
TRAIN = [("img0", {"cat"}), ("img1", {"dog", "car"}), ("img2", {"cat", "dog"}), ("img3", {"car"})]
VAL = [("img4", {"dog"}), ("img5", {"cat", "car"}), ("img6", {"cat", "dog", "car"})]
Items = list[tuple[str, set[str]]]


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(int(c) for c in np.random.default_rng(seed).integers(0, 255, 3))
    Image.new("RGB", (12, 10), colour).save(path)


# ---- writers: one per format, each in the layout its docs/data.md section describes ----


def _write_coco(root: Path, train: Items, val: Items, year: int) -> None:
    category_ids = {"cat": 17, "dog": 18, "car": 3}  # COCO's own ids: gaps, not in name order
    annotation_id = 1
    for split, items, first_id in (("train", train, 1), ("val", val, 100)):
        images, annotations = [], []
        for offset, (name, positives) in enumerate(items):
            image_id = first_id + offset
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": 12, "height": 10})
            for label in sorted(positives):
                annotations.append(
                    {
                        "id": annotation_id,
                        "image_id": image_id,
                        "category_id": category_ids[label],
                        "bbox": [0, 0, 4, 4],
                        "area": 16.0,
                        "iscrowd": 0,
                    }
                )
                annotation_id += 1
            if ".." not in name:
                _image(root / f"{split}{year}" / f"{name}.jpg", image_id)
        categories = [{"id": i, "name": n, "supercategory": "x"} for n, i in category_ids.items()]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )


def _voc_xml(name: str, objects: list[tuple[str, int]]) -> str:
    parts = "".join(
        f"<object><name>{label}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        f"<ymax>5</ymax></bndbox></object>"
        for label, difficult in objects
    )
    return (
        f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>"
        f"<size><width>12</width><height>10</height><depth>3</depth></size>{parts}</annotation>"
    )


def _write_voc(root: Path, train: Items, val: Items, year: int) -> None:
    year_dir = root / f"VOC{year}"
    sets = ("trainval", "test") if year == 2007 else ("train", "val")
    (year_dir / "ImageSets" / "Main").mkdir(parents=True)
    (year_dir / "Annotations").mkdir()
    for image_set, items in zip(sets, (train, val), strict=True):
        (year_dir / "ImageSets" / "Main" / f"{image_set}.txt").write_text(
            "".join(f"{n}\n" for n, _ in items)
        )
        for index, (name, positives) in enumerate(items):
            if ".." in name:
                continue
            (year_dir / "Annotations" / f"{name}.xml").write_text(
                _voc_xml(name, [(p, 0) for p in sorted(positives)])
            )
            _image(year_dir / "JPEGImages" / f"{name}.jpg", index)


def _write_nus_wide(root: Path, train: Items, val: Items) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "nus_wid_data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label", "split"])
        for split, items in (("train", train), ("val", val)):
            for index, (name, positives) in enumerate(items):
                writer.writerow([f"images/{name}.jpg", str(sorted(positives)), split])
                if ".." not in name:
                    _image(root / "images" / f"{name}.jpg", index)


def _write_openimages(root: Path, train: Items, val: Items) -> None:
    mids = {name: f"/m/0{name}" for name in CLASSES}
    root.mkdir(parents=True, exist_ok=True)
    for folder, items, csv_name in (
        ("train", train, "oidv6-train-annotations-human-imagelabels.csv"),
        ("validation", val, "validation-annotations-human-imagelabels.csv"),
    ):
        with (root / csv_name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            for index, (name, positives) in enumerate(items):
                for label in CLASSES:
                    # Positives verified 1; one verified negative each; the rest left unannotated.
                    if label in positives:
                        writer.writerow([name, "verification", mids[label], 1])
                    elif label == min(set(CLASSES) - positives, default=None):
                        writer.writerow([name, "verification", mids[label], 0])
                if ".." not in name:
                    _image(root / folder / f"{name}.jpg", index)


def _write_table(root: Path, train: Items, val: Items) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "labels"])
            for index, (name, positives) in enumerate(items):
                writer.writerow([f"photos/{name}.jpg", "|".join(sorted(positives))])
                if ".." not in name:
                    _image(root / "photos" / f"{name}.jpg", index)


@dataclass
class Case:
    option: str
    write: Callable[[Path, Items, Items], None]
    overrides: Callable[[Path], list[str]]  # beyond dataset=<option> dataset.root=<root>
    image: Callable[[Path, str], Path]  # where a train image lives
    overlap: Callable[[Path], list[str]]  # overrides making val read train's images
    expected_classes: list[str]


def _coco_case(year: int) -> Case:
    return Case(
        f"coco{year}",
        lambda r, t, v: _write_coco(r, t, v, year),
        lambda r: [f"dataset.cache_dir={r}/cache"],
        lambda r, n: r / f"train{year}" / f"{n}.jpg",
        lambda r: [
            f"dataset.val.image_dir={r}/train{year}",
            f"dataset.val.annotation_file={r}/annotations/instances_train{year}.json",
        ],
        ["car", "cat", "dog"],  # by category id: 3, 17, 18
    )


def _voc_case(year: int) -> Case:
    return Case(
        f"voc{year}",
        lambda r, t, v: _write_voc(r, t, v, year),
        lambda r: [],
        lambda r, n: r / f"VOC{year}" / "JPEGImages" / f"{n}.jpg",
        lambda r: [f"dataset.val.image_set={'trainval' if year == 2007 else 'train'}"],
        list(VOC_CLASSES),
    )


CASES = [
    _coco_case(2014),
    _coco_case(2017),
    _voc_case(2007),
    _voc_case(2012),
    Case(
        "nus_wide",
        _write_nus_wide,
        lambda r: [],
        lambda r, n: r / "images" / f"{n}.jpg",
        lambda r: ["dataset.val.split=train"],
        ["car", "cat", "dog"],
    ),
    Case(
        "openimages",
        _write_openimages,
        lambda r: [],
        lambda r, n: r / "train" / f"{n}.jpg",
        lambda r: [
            f"dataset.val.image_dir={r}/train",
            f"dataset.val.annotation_file={r}/oidv6-train-annotations-human-imagelabels.csv",
        ],
        ["/m/0car", "/m/0cat", "/m/0dog"],
    ),
    Case(
        "table",
        _write_table,
        lambda r: [f"dataset.val_file={r}/val.csv"],
        lambda r, n: r / "photos" / f"{n}.jpg",
        lambda r: [f"dataset.val_file={r}/train.csv"],
        ["car", "cat", "dog"],
    ),
]
IDS = [case.option for case in CASES]


@pytest.fixture
def build_splits(compose_config):
    """build_splits(case, root, *extra) -> (train, val) through the case's conf/dataset option."""

    def _build(case: Case, root: Path, *extra: str):
        cfg = compose_config(
            "train",
            [f"dataset={case.option}", f"dataset.root={root}", *case.overrides(root), *extra],
        )
        splits = []
        for node in (cfg.dataset.train, cfg.dataset.val):
            try:
                splits.append(instantiate(node))
            except InstantiationException as error:  # unwrap to the reader's own error
                raise error.__cause__ from None
        return tuple(splits)

    return _build


def _positives(dataset, index: int) -> set[str]:
    return {dataset.class_names[k] for k in np.flatnonzero(dataset.labels[index] == 1)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_format_reads_labels_and_classes(case, build_splits, tmp_path):
    case.write(tmp_path, TRAIN, VAL)
    train, val = build_splits(case, tmp_path)
    assert train.class_names == val.class_names == case.expected_classes
    for dataset, items in ((train, TRAIN), (val, VAL)):
        by_stem = {Path(path).stem: index for index, path in enumerate(dataset.image_paths)}
        assert sorted(by_stem) == sorted(name for name, _ in items)
        for name, positives in items:
            found = {label.removeprefix("/m/0") for label in _positives(dataset, by_stem[name])}
            assert found == positives, (case.option, name)
    report = validate_splits(train, val)
    assert report.splits["train"].images == len(TRAIN) and report.shared_images == []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_names_escaping_the_image_root_are_refused(case, build_splits, tmp_path):
    case.write(tmp_path, [*TRAIN, ("../../outside", {"cat"})], VAL)
    with pytest.raises(ValueError, match="escapes the image folder"):
        build_splits(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_missing_and_corrupt_images_are_all_listed(case, build_splits, tmp_path):
    case.write(tmp_path, TRAIN, VAL)
    case.image(tmp_path, "img1").unlink()
    case.image(tmp_path, "img2").write_bytes(b"not a jpeg at all")
    train, val = build_splits(case, tmp_path)
    with pytest.raises(DataValidationError) as error:
        validate_splits(train, val)
    message = str(error.value)
    assert (
        "img1.jpg" in message
        and "img2.jpg" in message
        and "missing" in message
        and "unreadable" in message
    )
    assert (
        error.value.report.counts()["train_missing"] == 1
        and error.value.report.counts()["train_unreadable"] == 1
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_val_overlap_is_a_hard_error(case, build_splits, tmp_path):
    case.write(tmp_path, TRAIN, VAL)
    train, val = build_splits(case, tmp_path, *case.overlap(tmp_path))
    with pytest.raises(DataValidationError, match="in both train and val"):
        validate_splits(train, val)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_format_is_rebuilt_from_a_stored_config(case, compose_config, tmp_path):
    """Eval rebuilds val from a checkpoint's stored (resolved, plain) config via the allowlist."""
    from omegaconf import OmegaConf

    case.write(tmp_path, TRAIN, VAL)
    cfg = compose_config(
        "train", [f"dataset={case.option}", f"dataset.root={tmp_path}", *case.overrides(tmp_path)]
    )
    stored = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["dataset"]["val"]
    dataset = instantiate_allowed(stored, DATASETS, transform=None)
    assert len(dataset) == len(VAL)


# ---- format-specific behaviour ----


def test_coco_duplicate_ids_and_unknown_categories_are_listed_together(tmp_path):
    from q2l.data.coco import CocoMultiLabel

    _write_coco(tmp_path, TRAIN, VAL, 2017)
    annotation_file = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(annotation_file.read_text())
    data["images"].append(dict(data["images"][0]))
    data["annotations"][0]["category_id"] = 99
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match="listed more than once.*unknown category ids \\(id: annotations\\): 99"
    ):
        CocoMultiLabel(tmp_path / "train2017", annotation_file)


@pytest.mark.parametrize(("policy", "target"), [("ignore", -1), ("positive", 1), ("negative", 0)])
def test_voc_difficult_only_objects_follow_the_policy(tmp_path, policy, target):
    _write_voc(tmp_path, TRAIN[:1], VAL, 2007)
    (tmp_path / "VOC2007" / "Annotations" / "img0.xml").write_text(
        _voc_xml("img0", [("cat", 0), ("dog", 1), ("car", 1), ("car", 0)])
    )
    labels = VocMultiLabel(tmp_path / "VOC2007", "trainval", difficult=policy).labels[0]
    column = {name: index for index, name in enumerate(VOC_CLASSES)}
    assert labels[column["cat"]] == 1 and labels[column["car"]] == 1  # a non-difficult car exists
    assert labels[column["dog"]] == target and labels[column["person"]] == 0


def test_voc_refuses_entity_declarations_and_unknown_classes(tmp_path):
    _write_voc(tmp_path, TRAIN[:2], VAL, 2007)
    annotations = tmp_path / "VOC2007" / "Annotations"
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx"><!ENTITY y "&x;&x;&x;&x;">]>'
    (annotations / "img0.xml").write_text(
        bomb + "<annotation><object><name>&y;</name></object></annotation>"
    )
    (annotations / "img1.xml").write_text(_voc_xml("img1", [("unicorn", 0)]))
    with pytest.raises(ValueError) as error:
        VocMultiLabel(tmp_path / "VOC2007", "trainval")
    assert "img0.xml: DTD or entity" in str(error.value) and "unknown class 'unicorn'" in str(
        error.value
    )
    utf16 = (bomb + "<annotation/>").replace('"1.0"?', '"1.0" encoding="utf-16"?').encode("utf-16")
    (annotations / "img0.xml").write_bytes(utf16)
    (annotations / "img1.xml").write_text(_voc_xml("img1", []))
    with pytest.raises(ValueError, match="DTD or entity"):
        VocMultiLabel(tmp_path / "VOC2007", "trainval")


def test_nus_wide_class_file_sets_the_order_and_can_ignore_extra_tags(compose_config, tmp_path):
    _write_nus_wide(tmp_path, TRAIN, VAL)
    (tmp_path / "concepts.txt").write_text("dog\ncat\n")
    overrides = [
        "dataset=nus_wide",
        f"dataset.root={tmp_path}",
        f"dataset.class_file={tmp_path}/concepts.txt",
    ]
    with pytest.raises(InstantiationException, match="'car'"):
        instantiate(compose_config("train", overrides).dataset.train)
    train = instantiate(
        compose_config("train", [*overrides, "dataset.unknown_labels=ignore"]).dataset.train
    )
    assert train.class_names == ["dog", "cat"] and train.labels[1].tolist() == [1, 0]


def test_openimages_confidence_maps_to_1_0_and_unknown(tmp_path):
    from q2l.data.openimages import OpenImagesMultiLabel

    _write_openimages(tmp_path, TRAIN, VAL)
    (tmp_path / "classes.csv").write_text("/m/0dog,Dog\n/m/0cat,Cat\n/m/0car,Cat\n")  # two "Cat"s
    dataset = OpenImagesMultiLabel(
        tmp_path / "train",
        tmp_path / "oidv6-train-annotations-human-imagelabels.csv",
        class_file=tmp_path / "classes.csv",
    )
    assert dataset.class_names == ["Dog", "Cat (/m/0cat)", "Cat (/m/0car)"]
    # img0: cat verified present, car verified absent (first absent name), dog never annotated.
    assert dataset.labels[0].tolist() == [-1, 1, 0]


def test_table_holds_out_a_seeded_fraction_and_reads_unknowns(tmp_path):
    _write_table(tmp_path, TRAIN + VAL, [])
    rows = (tmp_path / "train.csv").read_text().splitlines()
    rows[0] += ",unknown"
    rows[1] += ",dog"  # img0: cat present, dog unknown, car absent
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    split = {
        "image_root": tmp_path,
        "train_file": tmp_path / "train.csv",
        "val_fraction": 0.3,
        "split_seed": 1,
    }
    train, val = TableMultiLabel(**split), TableMultiLabel(split="val", **split)
    assert len(val) == 2 and len(train) == 5 and not set(train.image_ids) & set(val.image_ids)
    assert TableMultiLabel(split="val", **split).image_ids == val.image_ids  # same seed, same split
    assert TableMultiLabel(split="val", **{**split, "split_seed": 2}).image_ids != val.image_ids
    everything = {
        i: row
        for dataset in (train, val)
        for i, row in zip(dataset.image_ids, dataset.labels, strict=True)
    }
    assert everything["photos/img0.jpg"].tolist() == [0, 1, -1]  # classes: car, cat, dog


def test_table_json_with_classes_and_partial_annotation(tmp_path):
    for index in range(3):
        _image(tmp_path / f"{index}.png", index)
    records = [
        {"image": "0.png", "labels": ["b"], "negatives": "a"},
        {"image": "1.png", "labels": "a|c"},
        {"image": "2.png", "labels": [], "unknown": ["c"]},
    ]
    (tmp_path / "data.json").write_text(json.dumps({"classes": ["c", "b", "a"], "images": records}))
    (tmp_path / "val.jsonl").write_text(json.dumps(records[2]) + "\n")
    dataset = TableMultiLabel(
        tmp_path, tmp_path / "data.json", val_file=tmp_path / "val.jsonl", unlisted="unknown"
    )
    assert dataset.class_names == ["c", "b", "a"]
    assert dataset.labels.tolist() == [[-1, 1, 0], [1, -1, 1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="'zebra'"):
        records[0]["labels"] = ["zebra"]
        (tmp_path / "data.json").write_text(
            json.dumps({"classes": ["c", "b", "a"], "images": records})
        )
        TableMultiLabel(tmp_path, tmp_path / "data.json", val_file=tmp_path / "val.jsonl")


def test_table_without_required_column_names_it(tmp_path):
    (tmp_path / "train.csv").write_text("file,tags\nx.jpg,a\n")
    with pytest.raises(ValueError, match=r"no column \['image', 'labels'\]"):
        TableMultiLabel(tmp_path, tmp_path / "train.csv")

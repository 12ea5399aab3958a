"""Tests for q2l.demo.digits: COCO layout, determinism, held-out scans, idempotent atomic builds."""

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from q2l.demo import digits
from q2l.demo.digits import CATEGORY_NAMES, build_digits_coco, split_digit_scans
from q2l.demo.owned import MARKER_NAME, FolderNotOursError

SMALL = {"num_train": 60, "num_val": 20, "canvas_size": 64, "empty_fraction": 0.1, "seed": 0}


def _load_coco(path: Path) -> COCO:
    # pycocotools prints progress lines on construction; keep test output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _modification_times(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_coco(tmp_path_factory.mktemp("digits") / "coco", **SMALL)


def test_layout_matches_coco_2014(small_root: Path) -> None:
    assert (small_root / MARKER_NAME).is_file()
    for split, count in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        assert (small_root / "annotations" / f"instances_{split}2014.json").is_file()
        assert len(list((small_root / f"{split}2014").glob(f"COCO_{split}2014_*.jpg"))) == count
    assert not list(small_root.parent.glob(".coco.*")), "temporary folders must not outlive a build"
    assert (small_root / MARKER_NAME).stat().st_mtime_ns >= max(
        path.stat().st_mtime_ns for path in small_root.rglob("*") if path.is_file()
    ), "marker written last"


def test_categories_have_gapped_ids_listed_out_of_order(small_root: Path) -> None:
    raw = json.loads((small_root / "annotations" / "instances_train2014.json").read_text())
    listed_ids = [category["id"] for category in raw["categories"]]
    assert listed_ids != sorted(listed_ids)

    coco = _load_coco(small_root / "annotations" / "instances_train2014.json")
    category_ids = sorted(coco.getCatIds())
    assert len(category_ids) == 10
    assert category_ids != list(range(10)) and category_ids != list(range(1, 11))
    categories = coco.loadCats(category_ids)
    assert [category["name"] for category in categories] == list(CATEGORY_NAMES)
    assert {category["supercategory"] for category in categories} == {"digit"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_images_decode_and_annotations_are_valid(small_root: Path, split: str) -> None:
    coco = _load_coco(small_root / "annotations" / f"instances_{split}2014.json")
    size = SMALL["canvas_size"]
    count = SMALL[f"num_{split}"]
    num_empty = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert (info["width"], info["height"]) == (size, size)
        assert info["file_name"] == f"COCO_{split}2014_{image_id:012d}.jpg"
        with Image.open(small_root / f"{split}2014" / info["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (size, size)
            image.load()

        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if not annotations:
            num_empty += 1
            continue
        assert 1 <= len(annotations) <= 4
        for annotation in annotations:
            x, y, width, height = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + width <= size and y + height <= size
            assert width > 0 and height > 0
            assert annotation["area"] == width * height and annotation["iscrowd"] == 0
    assert len(coco.getImgIds()) == count
    assert num_empty == round(SMALL["empty_fraction"] * count)


def test_image_and_annotation_ids_unique_across_splits(small_root: Path) -> None:
    image_ids, annotation_ids = [], []
    for split in ("train", "val"):
        raw = json.loads((small_root / "annotations" / f"instances_{split}2014.json").read_text())
        image_ids += [image["id"] for image in raw["images"]]
        annotation_ids += [annotation["id"] for annotation in raw["annotations"]]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(annotation_ids)) == len(annotation_ids)


def test_same_arguments_give_byte_identical_files(small_root: Path, tmp_path: Path) -> None:
    other = build_digits_coco(tmp_path / "again", **SMALL)
    assert _file_bytes(other) == _file_bytes(small_root)


def test_scan_split_is_disjoint_complete_and_stratified() -> None:
    train_indices, val_indices = split_digit_scans(seed=0)
    _, targets = digits._load_scans()
    assert not set(train_indices) & set(val_indices)
    assert len(train_indices) + len(val_indices) == len(targets) == 1797
    for digit in range(10):
        in_val = np.sum(targets[val_indices] == digit)
        assert abs(in_val / np.sum(targets == digit) - 0.3) < 0.01
    assert not np.array_equal(split_digit_scans(seed=1)[1], val_indices)


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    root = build_digits_coco(tmp_path / "coco", **SMALL)
    before = _modification_times(root)
    assert build_digits_coco(str(root), **SMALL) == root
    assert _modification_times(root) == before


def test_changed_arguments_regenerate(tmp_path: Path) -> None:
    root = build_digits_coco(tmp_path / "coco", **SMALL)
    first = _file_bytes(root)
    build_digits_coco(root, **{**SMALL, "num_train": 30, "seed": 1})
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["arguments"]["seed"] == 1 and marker["arguments"]["num_train"] == 30
    assert len(list((root / "train2014").iterdir())) == 30
    assert _file_bytes(root) != first


def test_leftovers_of_a_crashed_build_are_cleared_and_foreign_folders_kept(tmp_path: Path) -> None:
    abandoned = tmp_path / ".coco.q2l-tmp-999-deadbeef"
    (abandoned / "train2014").mkdir(parents=True)
    (abandoned / ".q2l-building").write_text("")  # the stamp every build folder gets first
    os.utime(abandoned, (0, 0))
    unstamped = tmp_path / ".coco.q2l-tmp-998-cafebabe"  # same name pattern, not ours: kept
    unstamped.mkdir()
    (unstamped / "photo.jpg").write_bytes(b"x")
    os.utime(unstamped, (0, 0))

    root = build_digits_coco(tmp_path / "coco", **SMALL)
    assert not abandoned.exists()
    assert (unstamped / "photo.jpg").read_bytes() == b"x"
    assert len(list((root / "train2014").iterdir())) == SMALL["num_train"]
    marker = json.loads((root / MARKER_NAME).read_text())
    assert (
        marker["kind"] == "the digits demo data set"
        and marker["arguments"]["seed"] == SMALL["seed"]
    )
    assert len(marker["files"]) == SMALL["num_train"] + SMALL["num_val"] + 2


def test_a_coco_layout_folder_without_marker_is_never_replaced(tmp_path: Path) -> None:
    # A user's own COCO 2014 folder holds exactly the names the builder writes.
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    (tmp_path / "coco" / "val2014").mkdir()
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg").write_bytes(b"real photo")
    (tmp_path / "coco" / "annotations" / "instances_train2014.json").write_text("{}")
    before = _file_bytes(tmp_path / "coco")
    with pytest.raises(
        FolderNotOursError, match=r"coco.*q2l did not write.*annotations/instances_train2014.json"
    ):
        build_digits_coco(tmp_path / "coco", **SMALL)
    assert _file_bytes(tmp_path / "coco") == before
    assert [path.name for path in tmp_path.iterdir()] == ["coco"], "refused before building"


def test_a_file_added_to_a_built_folder_blocks_a_rebuild(tmp_path: Path) -> None:
    root = build_digits_coco(tmp_path / "coco", **SMALL)
    (root / "train2014" / "mine.jpg").write_bytes(b"added by the user")
    with pytest.raises(FolderNotOursError, match="train2014/mine.jpg"):
        build_digits_coco(root, **{**SMALL, "seed": 1})
    assert (root / "train2014" / "mine.jpg").read_bytes() == b"added by the user"
    assert build_digits_coco(root, **SMALL) == root  # the same arguments still match: nothing to do


def test_an_unwritable_data_dir_names_the_path_and_the_variable(
    tmp_path: Path, monkeypatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("Q2L_DATA_DIR", str(blocker))
    with pytest.raises(
        PermissionError,
        match=r"cannot write the digits demo data set to .*file/digits.*Q2L_DATA_DIR "
        r"\(now .*file\)",
    ):
        build_digits_coco(blocker / "digits", **SMALL)


def test_losing_the_rename_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "coco"
    write_data_set = digits._write_data_set
    winner: dict[str, int] = {}

    def write_while_another_caller_finishes_first(folder: Path, arguments: dict) -> None:
        write_data_set(folder, arguments)
        monkeypatch.setattr(digits, "_write_data_set", write_data_set)
        build_digits_coco(root, **SMALL)
        winner.update(_modification_times(root))

    monkeypatch.setattr(digits, "_write_data_set", write_while_another_caller_finishes_first)
    build_digits_coco(root, **SMALL)
    assert _modification_times(root) == winner
    assert not list(tmp_path.glob(".coco.*"))


def test_refuses_to_delete_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FolderNotOursError):
        build_digits_coco(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert [path.name for path in tmp_path.iterdir()] == ["mine"], "refuse before building"


@pytest.mark.parametrize(
    "overrides",
    [{"num_val": 0}, {"min_digits": 0}, {"min_digits": 3, "max_digits": 2}, {"canvas_size": 12}],
)
def test_rejects_bad_arguments(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        build_digits_coco(tmp_path / "coco", **{**SMALL, **overrides})

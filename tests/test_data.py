"""COCO loading, label cache, path confinement, decoding, transforms, sampling, partial labels."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from q2l.data.coco import CocoMultiLabel
from q2l.data.dataset import BadImageError, MultiLabelImageDataset, load_rgb, open_image
from q2l.data.loader import EpochSampler, build_loader
from q2l.data.partial import hide_labels
from q2l.data.seeding import SampleKey
from q2l.data.transforms import Cutout, build_eval_transform, build_train_transform
from q2l.data.validate import DataValidationError
from q2l.training.resume import RESUME_IGNORED_KEYS, config_diff
from q2l.training.run import train

from .conftest import SENTINEL
from .helpers.images import write_huge_png


def _coco(root, split="val", **kwargs):
    return CocoMultiLabel(
        root / f"{split}2014", root / "annotations" / f"instances_{split}2014.json", **kwargs
    )


def test_classes_follow_sorted_category_ids_with_names(digits_root):
    dataset = _coco(digits_root)
    assert dataset.class_names == [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    ]
    annotation = json.loads((digits_root / "annotations" / "instances_val2014.json").read_text())
    by_id = {c["id"]: c["name"] for c in annotation["categories"]}
    first = sorted(annotation["images"], key=lambda image: image["id"])[0]
    names = {
        by_id[a["category_id"]] for a in annotation["annotations"] if a["image_id"] == first["id"]
    }
    assert {dataset.class_names[k] for k in np.flatnonzero(dataset.labels[0])} == names


def test_keep_unannotated_is_a_choice(digits_root):
    kept, dropped = _coco(digits_root, "train"), _coco(digits_root, "train", keep_unannotated=False)
    assert len(kept) > len(dropped)
    assert (kept.labels.sum(1) == 0).sum() == len(kept) - len(dropped)
    assert dropped.labels.sum(1).min() >= 1


def test_items_are_image_and_target(digits_root):
    dataset = _coco(digits_root, transform=build_eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    image, target = dataset[0]
    assert image.shape == (3, 32, 32) and target.shape == (10,) and target.dtype == torch.float32


def test_label_cache_is_keyed_by_annotation_content(digits_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(digits_root, root)
    cache = tmp_path / "cache"
    first = _coco(root, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    annotation_file = root / "annotations" / "instances_val2014.json"
    data = json.loads(annotation_file.read_text())
    data["annotations"] = data["annotations"][1:]  # edit the file: the old cache must not be used
    annotation_file.write_text(json.dumps(data))
    second = _coco(root, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    assert second.labels.sum() == first.labels.sum() - 1
    assert _coco(root, cache_dir=cache).labels.sum() == second.labels.sum()  # served from the cache


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd"])
def test_file_names_cannot_escape_the_image_folder(digits_root, tmp_path, file_name):
    root = tmp_path / "copy"
    shutil.copytree(digits_root, root)
    annotation_file = root / "annotations" / "instances_val2014.json"
    data = json.loads(annotation_file.read_text())
    data["images"][0]["file_name"] = file_name
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="escapes the image folder"):
        _coco(root)


def test_broken_annotation_file_is_named(tmp_path, digits_root):
    annotation_file = tmp_path / "broken.json"
    annotation_file.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoMultiLabel(digits_root / "val2014", annotation_file)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoMultiLabel(digits_root / "val2014", tmp_path / "missing.json")


def test_unreadable_images_are_named(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        load_rgb(truncated)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(BadImageError, match="notes.jpg"):
        load_rgb(not_image)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = (
        tmp_path / f"image_{mode.replace(';', '')}.png"
        if mode != "CMYK"
        else tmp_path / "image.jpg"
    )
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (8, 8)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 8)
    if mode == "I;16":
        assert np.asarray(image).min() == 255  # scaled, not clipped


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_train_transform_recipe_runs():
    transform = build_train_transform(
        48, (0.5,) * 3, (0.5,) * 3, hflip=0.5, scale=[0.5, 1.0], randaugment=True, cutout_factor=0.5
    )
    assert transform(Image.new("RGB", (80, 60), (10, 200, 30))).shape == (3, 48, 48)


def test_cutout_paints_one_square():
    torch.manual_seed(0)
    image = Cutout(0.5)(Image.new("RGB", (40, 40), (0, 0, 0)))
    painted = (np.asarray(image).sum(-1) > 0).sum()
    assert 0 < painted <= 20 * 20


def test_sampler_order_depends_on_seed_and_epoch_only():
    sampler = EpochSampler(20, shuffle=True, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(20))
    again = EpochSampler(20, shuffle=True, seed=3)
    again.set_epoch(0)
    assert list(again) == epoch0
    again.set_epoch(0, start=5)
    assert list(again) == epoch0[5:] and len(again) == 15


def test_sampler_shards_by_rank():
    shards = []
    for rank in range(3):
        sampler = EpochSampler(10, shuffle=True, seed=0, rank=rank, world_size=3, drop_last=True)
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(sum(shards, []))) == 9


def test_eval_loader_keeps_every_sample_in_order(digits_root):
    dataset = _coco(digits_root, transform=build_eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    loader = build_loader(dataset, batch_size=10, train=False)
    targets = torch.cat([batch[1] for batch in loader])
    assert torch.equal(targets, torch.from_numpy(dataset.labels.astype(np.float32)))


def test_training_sampler_hands_out_seeded_keys(digits_root):
    loader = build_loader(_coco(digits_root), batch_size=4, train=True, seed=5)
    loader.sampler.set_epoch(3)
    keys = list(loader.sampler)
    assert all(isinstance(k, SampleKey) and k.seed == 5 and k.epoch == 3 for k in keys)
    assert sorted(k.index for k in keys) == list(range(len(keys)))


def test_hide_labels_keeps_a_seeded_share_of_each_row():
    labels = np.random.default_rng(0).integers(0, 2, (50, 10)).astype(np.int8)
    labels[0, :4] = -1  # already unknown: stays unknown, and is not counted as known
    hidden = hide_labels(labels, keep_ratio=0.3, seed=1)
    kept = hidden != -1
    assert kept.sum(1).tolist() == [2] + [3] * 49  # round(0.3 * 6) for row 0, round(0.3 * 10) after
    assert (hidden[kept] == labels[kept]).all() and (hidden[0, :4] == -1).all()
    assert np.array_equal(hide_labels(labels, 0.3, seed=1), hidden)
    assert not np.array_equal(hide_labels(labels, 0.3, seed=2), hidden)
    assert np.array_equal(hide_labels(labels, 1.0), labels)


def test_partial_labels_hide_train_labels_only(tiny_cfg):
    from q2l.training.build import build_datasets

    full_train, full_val = build_datasets(tiny_cfg(), (0.5,) * 3, (0.5,) * 3)
    cfg = tiny_cfg("dataset.partial.keep_ratio=0.5", "loss=partial_asl")
    train_set, val_set = build_datasets(cfg, (0.5,) * 3, (0.5,) * 3)
    assert (train_set.labels == -1).mean() == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(val_set.labels, full_val.labels) and not (full_train.labels == -1).any()
    with pytest.raises(ValueError, match="unknown \\(-1\\) entries, which loss=asl"):
        build_datasets(tiny_cfg("dataset.partial.keep_ratio=0.5"), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.slow
def test_partial_asl_trains_end_to_end_on_hidden_labels(tiny_cfg, tmp_path):
    from q2l.training.run import train

    summary = train(
        tiny_cfg("loss=partial_asl", "dataset.partial.keep_ratio=0.4", "trainer.epochs=1"), tmp_path
    )
    assert summary["status"] == "completed" and np.isfinite(summary["best"]["mAP"])


# ---- the pixel limit (dataset.max_image_pixels) ----


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 12000 x 12000 (144 megapixel) PNG of 18 kB: over Pillow's default limit, under twice it."""
    return write_huge_png(tmp_path_factory.mktemp("huge") / "huge.png", 12000, 12000)


@pytest.fixture
def never_decode(monkeypatch):
    """Decoding a PNG over 10 megapixels fails the test: the limit must refuse from the header."""
    load = PngImagePlugin.PngImageFile.load

    def decode(self, *args, **kwargs):
        if self.size[0] * self.size[1] > 10**7:
            pytest.fail(f"{self.filename} was decoded")
        return load(self, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decode)


def test_without_the_limit_a_huge_image_reaches_the_decode_sentinel(huge_png, never_decode):
    """The positive control of never_decode: a dataset decodes through the method it replaces."""
    dataset = MultiLabelImageDataset(
        [huge_png], np.ones((1, 1), np.int8), ["x"], max_image_pixels=None
    )
    with pytest.raises(SENTINEL, match="huge.png was decoded"):
        dataset[0]


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(huge_png, never_decode):
    dataset = MultiLabelImageDataset([huge_png], np.ones((1, 1), np.int8), ["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not Pillow's DecompressionBombWarning either
        with pytest.raises(BadImageError) as error:
            dataset[0]
    message = str(error.value)
    assert str(huge_png) in message and "12000 x 12000 = 144,000,000 pixels" in message
    assert "dataset.max_image_pixels=89478485" in message


def test_skip_passes_over_an_image_over_the_limit(huge_png, tmp_path, never_decode, caplog):
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20), "red").save(small)
    dataset = MultiLabelImageDataset(
        [huge_png, small],
        np.eye(2, dtype=np.int8),
        ["a", "b"],
        on_bad_image="skip",
        max_bad_fraction=0.5,
    )
    image, target = dataset[0]  # the next readable sample stands in for it
    assert image.size == (30, 20) and target.tolist() == [0.0, 1.0]
    assert dataset.bad_images == 1 and "dataset.max_image_pixels" in caplog.text


def test_the_limit_is_configurable_and_null_lifts_it(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20), "red").save(small)
    with pytest.raises(
        BadImageError, match=r"30 x 20 = 600 pixels, more than max_image_pixels=599"
    ):
        load_rgb(small, max_pixels=599, limit_key="max_image_pixels")
    assert load_rgb(small, max_pixels=600).size == (30, 20)
    # null: no limit, Pillow's own (which refuses twice its default) included.
    huge = write_huge_png(tmp_path / "huger.png", 14000, 14000)  # 196 Mpx > 2 x 89.5 Mpx
    with open_image(huge, None) as image:
        assert image.size == (14000, 14000)
    with pytest.raises(ValueError, match="max_image_pixels must be at least 1"):
        MultiLabelImageDataset([small], np.ones((1, 1), np.int8), ["x"], max_image_pixels=0)


@pytest.mark.slow
def test_training_takes_the_limit_from_the_config_and_skips_over_it(
    tiny_cfg, digits_root, tmp_path, huge_png, never_decode
):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    shutil.copy(huge_png, root / "train2014" / "huge.png")
    annotations = root / "annotations" / "instances_train2014.json"
    coco = json.loads(annotations.read_text())
    coco["images"].append({"id": 10**6, "file_name": "huge.png", "width": 12000, "height": 12000})
    annotations.write_text(json.dumps(coco))
    overrides = [f"dataset.root={root}", "trainer.epochs=1"]
    # Refused by the data check, naming the file, its size and the key...
    with pytest.raises(DataValidationError, match=r"huge.png: image .* 12000 x 12000 .* pixels"):
        train(tiny_cfg(*overrides), tmp_path / "refused")
    # ... and skipped like any bad image with on_bad_image=skip.
    skip = ["dataset.on_bad_image=skip", "dataset.max_bad_fraction=0.1"]
    summary = train(tiny_cfg(*overrides, *skip), tmp_path / "run")
    assert summary["status"] == "completed"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "huge.png is 12000 x 12000" in log and "dataset.max_image_pixels=89478485" in log


def test_runs_from_before_the_limit_resume_and_may_raise_it():
    saved = {"dataset": {"name": "coco2014", "image_size": 448}}
    for value in (89_478_485, None):
        current = {"dataset": {**saved["dataset"], "max_image_pixels": value}}
        assert config_diff(saved, current, ignore=RESUME_IGNORED_KEYS) == []

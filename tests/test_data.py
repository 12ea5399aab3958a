"""COCO loading, label cache, path confinement, decoding, transforms, sampling, partial labels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from q2l.data.coco import CocoMultiLabel
from q2l.data.dataset import BadImageError, load_rgb
from q2l.data.loader import EpochSampler, build_loader
from q2l.data.partial import hide_labels
from q2l.data.seeding import SampleKey
from q2l.data.transforms import Cutout, build_eval_transform, build_train_transform


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
    from q2l.build import build_datasets

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

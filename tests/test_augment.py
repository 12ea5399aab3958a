"""Augmentation: every conf/augment option, per-sample seeding, MixUp/CutMix with -1 targets,
draft decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from q2l.config import CONFIG_DIR
from q2l.data.dataset import MultiLabelImageDataset, load_rgb
from q2l.data.loader import build_loader
from q2l.data.mix import MultiLabelMixup, build_batch_transform
from q2l.data.transforms import build_eval_transform, build_train_transform

MEAN = STD = (0.5, 0.5, 0.5)
EVERYTHING = {
    "hflip": 0.5,
    "scale": [0.3, 1.0],
    "randaugment": True,
    "cutout_factor": 0.3,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.5,
    "random_erasing_count": 2,
}


def _noise_images(root: Path, count: int, size: int = 40) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        paths.append(root / f"{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _dataset(root: Path, transform) -> MultiLabelImageDataset:
    paths = _noise_images(root, 8)
    labels = np.random.default_rng(0).integers(-1, 2, (8, 5)).astype(np.int8)
    return MultiLabelImageDataset(paths, labels, [f"c{k}" for k in range(5)], transform)


@pytest.mark.parametrize(
    "option", sorted(p.stem for p in (Path(CONFIG_DIR) / "augment").glob("*.yaml"))
)
def test_every_augment_option_builds_and_runs(compose_config, option):
    cfg = compose_config("train", [f"augment={option}", "dataset=digits", "dataset.batch_size=4"])
    augment = OmegaConf.to_container(cfg.augment, enum_to_str=True)
    mix = augment.pop("mix")
    transform = build_train_transform(32, MEAN, STD, **augment)
    assert transform(Image.new("RGB", (50, 40), (10, 200, 30))).shape == (3, 32, 32)
    batch_transform = build_batch_transform(mix, num_classes=3, batch_size=4)
    if batch_transform is not None:
        images, targets = batch_transform(
            torch.rand(4, 3, 32, 32), torch.tensor([[1.0, 0, -1]] * 4)
        )
        assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 3)


def test_the_two_query2label_recipes_differ_only_in_the_cutout_hole(compose_config):
    """augment=q2l: the half-side hole the official command asks for (and ASL runs);
    augment=q2l_official: what the official runs did, whose broken Cutout call painted at most
    3x3 px, i.e. no Cutout. Both: the official RandAugment policy, no flip, square resize."""
    intended = compose_config("train", ["augment=q2l", "dataset=digits"]).augment
    official = compose_config("train", ["augment=q2l_official", "dataset=digits"]).augment
    assert intended.cutout_factor == 0.5 and official.cutout_factor == 0
    intended.cutout_factor = 0
    assert intended == official
    assert official.randaugment and official.randaugment_policy == "official"
    assert official.hflip == 0 and official.scale is None


def test_eval_transform_is_deterministic():
    transform = build_eval_transform(24, MEAN, STD)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    assert torch.equal(transform(image), transform(image))


def _epochs(dataset, num_workers: int) -> list[list[torch.Tensor]]:
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=num_workers, seed=7)
    batches = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches.append([images for images, _ in loader])
    return batches


def test_augmentation_is_the_same_whatever_num_workers(tmp_path):
    dataset = _dataset(tmp_path, build_train_transform(32, MEAN, STD, **EVERYTHING))
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    in_process = _epochs(dataset, num_workers=0)
    # Loading in the main process left its generators alone (dropout and MixUp draw from them).
    assert torch.equal(torch.rand(3), before)
    with_workers = _epochs(dataset, num_workers=2)
    for epoch in range(2):
        for a, b in zip(in_process[epoch], with_workers[epoch], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(
        torch.cat(in_process[0]).sum(0), torch.cat(in_process[1]).sum(0)
    )  # epochs differ


def test_mixup_keeps_unknown_targets_unknown():
    np.random.seed(0)
    images = torch.stack(
        [torch.full((3, 8, 8), 1.0), torch.full((3, 8, 8), 0.0)]
    )  # mirror of 0 is 1
    targets = torch.tensor([[1.0, 0.0, -1.0, 1.0], [0.0, 0.0, 1.0, -1.0]])
    mixed_images, mixed = MultiLabelMixup(num_classes=4, mixup_alpha=1.0)(images.clone(), targets)
    lam = mixed_images[0, 0, 0, 0].item()  # image 0 = lam·1 + (1 - lam)·0
    assert 0 < lam < 1
    assert mixed[0, :2].tolist() == pytest.approx([lam, 0.0]) and mixed[
        1, :2
    ].tolist() == pytest.approx([1 - lam, 0.0])
    assert (mixed[:, 2:] == -1).all()  # unknown in either source image -> unknown


def test_cutmix_mixes_targets_by_pasted_area():
    images = torch.stack([torch.ones(3, 16, 16), torch.zeros(3, 16, 16)])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kept_shares = []
    for seed in range(5):
        np.random.seed(seed)
        mixed_images, mixed = MultiLabelMixup(num_classes=2, cutmix_alpha=1.0)(
            images.clone(), targets
        )
        kept = mixed_images[0].mean().item()  # share of image 0 still its own
        assert mixed[0].tolist() == pytest.approx([kept, 1 - kept])
        kept_shares.append(kept)
    assert any(0 < kept < 1 for kept in kept_shares)


def test_mix_refuses_odd_batches():
    with pytest.raises(ValueError, match="even dataset.batch_size"):
        build_batch_transform({"mixup_alpha": 0.8}, num_classes=3, batch_size=5)
    assert (
        build_batch_transform(
            {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, num_classes=3, batch_size=5
        )
        is None
    )


def test_large_jpegs_decode_at_reduced_size_but_never_below_need(tmp_path):
    path = tmp_path / "large.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90°
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(
        path, exif=exif
    )
    assert load_rgb(path).size == (600, 800)  # upright
    reduced = load_rgb(path, min_size=100)
    assert reduced.size == (150, 200) and min(reduced.size) >= 100  # 1/4 scale, still upright
    assert load_rgb(path, min_size=400).size == (600, 800)  # less than 2x headroom: full size
    transform = build_train_transform(64, MEAN, STD, scale=[0.5, 1.0])
    assert transform.min_decode_size == 105  # the smallest crop still spans 64 px
    assert build_eval_transform(64, MEAN, STD).min_decode_size == 64

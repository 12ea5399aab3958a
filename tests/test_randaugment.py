"""The official code's RandAugment policy (PyPI randaugment 1.0.2), as q2l.data.randaugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from q2l.data.randaugment import (
    CUTOUT_SIZES,
    OPERATIONS,
    POSTERIZE_BITS,
    OfficialRandAugment,
    _level_value,
    apply_operation,
)
from q2l.data.transforms import build_train_transform


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 31, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_level_tables_are_the_reference_linspaces():
    for start, stop in [(0.0, 0.3), (0.0, 150 / 331), (0.0, 30.0), (0.0, 0.9), (256.0, 0.0)]:
        table = np.linspace(start, stop, 10)
        assert [_level_value(start, stop, m) for m in range(10)] == table.tolist()
    assert list(POSTERIZE_BITS) == np.round(np.linspace(8, 4, 10)).astype(int).tolist()
    assert list(CUTOUT_SIZES) == np.round(np.linspace(0, 20, 10)).astype(int).tolist()
    assert len(OPERATIONS) == 15 and {"invert", "cutout", "rotate"} <= set(OPERATIONS)


def test_operations_at_their_levels():
    image = _image()
    grey = (128, 128, 128)
    assert (
        apply_operation(image, "rotate", 9).tobytes() == image.rotate(30, fillcolor=grey).tobytes()
    )
    assert (
        apply_operation(image, "posterize", 3).tobytes() == ImageOps.posterize(image, 7).tobytes()
    )
    assert apply_operation(image, "solarize", 9).tobytes() == ImageOps.invert(image).tobytes()
    left = apply_operation(image, "shear_x", 5, sign=-1)
    right = apply_operation(image, "shear_x", 5, sign=1)
    assert left.size == image.size and left.tobytes() != right.tobytes()
    shifted = np.asarray(apply_operation(image, "translate_x", 9, sign=1))
    assert (shifted[:, -14:] == 128).all()  # 150/331 of 31 px shifted in from the right: grey
    torch.manual_seed(0)
    cut = np.asarray(apply_operation(image, "cutout", 9))
    assert ((cut == (125, 122, 113)).all(axis=-1)).sum() > 0
    with pytest.raises(ValueError, match="unknown operation"):
        apply_operation(image, "blur", 3)


def test_policy_applies_each_drawn_operation_half_the_time():
    image = _image()
    torch.manual_seed(0)
    policy = OfficialRandAugment()
    unchanged = sum(policy(image).tobytes() == image.tobytes() for _ in range(400))
    # Both draws skipped: 1/4; a few operations leave noise unchanged at some levels.
    assert 0.2 < unchanged / 400 < 0.4
    torch.manual_seed(3)
    first = [policy(image).tobytes() for _ in range(5)]
    torch.manual_seed(3)
    assert [policy(image).tobytes() for _ in range(5)] == first  # torch's generator drives it


def test_augment_q2l_uses_the_official_policy(compose_config):
    cfg = compose_config("train", ["augment=q2l", "dataset=digits"])
    assert cfg.augment.randaugment and cfg.augment.randaugment_policy == "official"
    transform = build_train_transform(
        32, (0.5,) * 3, (0.5,) * 3, randaugment=True, randaugment_policy="official"
    )
    assert any(isinstance(step, OfficialRandAugment) for step in transform.transforms)
    assert transform(_image()).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="randaugment_policy"):
        build_train_transform(
            32, (0.5,) * 3, (0.5,) * 3, randaugment=True, randaugment_policy="timm"
        )

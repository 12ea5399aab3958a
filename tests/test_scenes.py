"""q2l.demo.scenes: the learning study's cluttered scenes and single-object pretraining crops."""

from __future__ import annotations

import torch

from q2l.demo.scenes import NO_DIGIT, NUM_CLASSES, render_crops, render_scenes


def test_scenes_are_seeded_labelled_and_of_the_requested_size():
    images, targets = render_scenes(12, "train", size=96, seed=3)
    assert images.shape == (12, 3, 96, 96) and images.dtype == torch.uint8
    assert targets.shape == (12, NUM_CLASSES) and set(targets.unique().tolist()) <= {0.0, 1.0}
    per_image = targets.sum(1)
    assert per_image.min() >= 1 and per_image.max() <= 4  # 1-4 digits, classes may repeat
    again, same_targets = render_scenes(12, "train", size=96, seed=3)
    assert torch.equal(images, again) and torch.equal(targets, same_targets)
    val, _ = render_scenes(12, "val", size=96, seed=3)
    assert not torch.equal(images, val)  # another scan pool, another stream


def test_distractors_alone_carry_no_label():
    images, targets = render_scenes(6, "val", size=64, objects=(0, 0), distractors=(3, 3))
    assert not targets.any()
    assert images.float().std() > 0  # but the canvases are not empty


def test_crops_name_their_digit_or_none():
    images, labels = render_crops(40, size=32, no_digit_fraction=0.25, seed=1)
    assert images.shape == (40, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= NO_DIGIT
    assert (labels == NO_DIGIT).any() and (labels < NO_DIGIT).any()

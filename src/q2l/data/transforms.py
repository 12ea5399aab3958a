"""Image transforms: the Query2Label/ASL training recipe, timm's policies, deterministic evaluation.

Normalisation comes from the backbone's pretrained config (timm), so TResNet gets mean 0 / std 1
and ResNets get ImageNet statistics without a flag. Geometry and colour operations run on uint8
PIL images, before the conversion to float; RandomErasing runs on the normalised tensor, as timm
applies it. Both builders return an `ImageTransform`, whose `min_decode_size` lets the dataset
decode large JPEGs at a reduced scale (see `q2l.data.dataset.load_rgb`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageDraw
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from q2l.data.randaugment import OfficialRandAugment
from q2l.utils.errors import ConfigError

# RandomResizedCrop's default aspect-ratio range; its lower end bounds the narrowest crop side.
_MIN_CROP_ASPECT = 3.0 / 4.0
RANDAUGMENT_POLICIES = ("torchvision", "official")


class ImageTransform(T.Compose):
    """A Compose that also says how large the decoded image must be for full-quality output.

    min_decode_size: the smallest side (px) a decoded image may be reduced to before these
    transforms without losing output resolution.
    """

    def __init__(self, transforms: list[Callable], min_decode_size: int) -> None:
        super().__init__(transforms)
        self.min_decode_size = min_decode_size


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float = 0.0,
    scale: Sequence[float] | None = None,
    randaugment: bool = False,
    randaugment_policy: str = "torchvision",
    randaugment_num_ops: int = 2,
    randaugment_magnitude: int = 9,
    cutout_factor: float = 0.0,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    random_erasing_mode: str = "pixel",
    random_erasing_count: int = 1,
) -> ImageTransform:
    """PIL image -> (3, image_size, image_size) float tensor, randomly augmented.

    Order: square resize (or random resized crop), flip, Cutout, RandAugment, timm policy
    (`auto_augment`), tensor conversion, normalisation, RandomErasing. The first steps are ASL's;
    the timm steps follow timm's own order.

    Args:
        hflip: probability of a horizontal flip.
        scale: RandomResizedCrop area range; None resizes the whole image to a square.
        cutout_factor: Cutout's hole side as a share of the image side (0: no Cutout).
        randaugment: apply RandAugment (the policy `randaugment_policy` names).
        randaugment_num_ops: operations per image (randaugment_policy=torchvision).
        randaugment_magnitude: their strength, 0-30 (randaugment_policy=torchvision).
        randaugment_policy: "torchvision" (T.RandAugment with `randaugment_num_ops` operations at
            `randaugment_magnitude`) or "official": the PyPI `randaugment` 1.0.2 policy the
            official Query2Label and ASL code use (q2l.data.randaugment; two operations at random
            levels, each with probability 0.5; the num_ops/magnitude options do not apply).
        auto_augment: a timm policy string: "rand-m9-mstd0.5-inc1" (RandAugment), "original",
            "originalr", "v0", "v0r" (AutoAugment), "augmix-m5-w3" (AugMix); None for none.
        random_erasing: probability of timm's RandomErasing.
        random_erasing_mode: what fills an erased box: const, rand or pixel.
        random_erasing_count: the most boxes erased per image.
    """
    steps: list = []
    if scale is not None:
        steps.append(T.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True))
        # The smallest crop (area scale[0], narrowest aspect) must still span image_size pixels.
        min_decode_size = math.ceil(image_size / math.sqrt(scale[0] * _MIN_CROP_ASPECT))
    else:
        steps.append(T.Resize((image_size, image_size), antialias=True))
        min_decode_size = image_size
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if cutout_factor > 0:
        steps.append(Cutout(cutout_factor))
    if randaugment:
        policy = str(getattr(randaugment_policy, "value", randaugment_policy))
        if policy not in RANDAUGMENT_POLICIES:
            raise ConfigError(
                f"augment.randaugment_policy={policy!r}: choose one of {RANDAUGMENT_POLICIES}"
            )
        steps.append(
            OfficialRandAugment()
            if policy == "official"
            else T.RandAugment(num_ops=randaugment_num_ops, magnitude=randaugment_magnitude)
        )
    if auto_augment:
        steps.append(build_timm_policy(auto_augment, image_size, mean))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if random_erasing > 0:
        mode = str(getattr(random_erasing_mode, "value", random_erasing_mode))
        steps.append(
            RandomErasing(random_erasing, mode=mode, max_count=random_erasing_count, device="cpu")
        )
    return ImageTransform(steps, min_decode_size)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> ImageTransform:
    """PIL image -> (3, image_size, image_size) float tensor; deterministic square resize."""
    steps = [
        T.Resize((image_size, image_size), antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    return ImageTransform(steps, image_size)


def build_timm_policy(
    policy: str, image_size: int, mean: Sequence[float]
) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment / AutoAugment / AugMix from its config string, with timm's hparams.

    The hparams are those timm's own training transforms pass: translations up to 45% of the
    image side, and fill colour = the normalisation mean, so filled borders normalise to zero.
    """
    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * channel)) for channel in mean),
    }
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, hparams)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(policy, hparams)
    except (AssertionError, KeyError, ValueError) as error:  # timm checks its strings with assert
        raise ConfigError(
            f"augment.auto_augment={policy!r} is not a timm policy string such as "
            "rand-m9-mstd0.5-inc1, "
            f"original, v0 or augmix-m5-w3 ({type(error).__name__}: {error})"
        ) from error


class Cutout:
    """Paint one square of side `factor`·size, filled with a random colour, at a random centre.

    The hole is clipped at the image border, as in ASL's CutoutPIL.
    """

    def __init__(self, factor: float = 0.5) -> None:
        if not 0 < factor <= 1:
            raise ConfigError(f"cutout factor must be in (0, 1], got {factor}")
        self.factor = factor

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        hole_w, hole_h = int(self.factor * width), int(self.factor * height)
        # torch's RNG, so worker seeding makes the hole reproducible.
        center_x = int(torch.randint(width, ()).item())
        center_y = int(torch.randint(height, ()).item())
        box = (
            max(center_x - hole_w // 2, 0),
            max(center_y - hole_h // 2, 0),
            min(center_x + hole_w // 2, width),
            min(center_y + hole_h // 2, height),
        )
        colour = tuple(int(c) for c in torch.randint(256, (3,)))
        image = image.copy()
        ImageDraw.Draw(image).rectangle(box, fill=colour)
        return image

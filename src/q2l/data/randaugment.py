"""The RandAugment policy the official Query2Label and ASL code train with: PyPI `randaugment`
1.0.2 (`from randaugment import RandAugment`; adapted there from the UDA implementation).

It is not torchvision's RandAugment. Per image, two operations are drawn uniformly (with
replacement) from 15, each with its own magnitude level drawn uniformly from 1..9, and each is
applied with probability 0.5. At level m (of a 0..9 scale):

    shear x/y      ±0.3·m/9 (bicubic)          translate x/y  ±(150/331)·m/9 of the side
    rotate         +30·m/9 degrees (one way)   color, contrast, sharpness, brightness  1 ± 0.1·m
    posterize      round(8 − 4·m/9) bits       solarize       threshold 256 − 256·m/9
    cutout         a square of round(20·m/9) px (clipped to an even side), colour (125, 122, 113)
    autocontrast, equalize, invert: no magnitude

Geometric operations fill with grey (128, 128, 128). torchvision's policy instead applies two of
14 operations (identity included) always, at one fixed magnitude (9 of 31 bins), rotates both
ways, has no invert or cutout and different ranges. Randomness comes from torch's generator, which
q2l seeds per sample (q2l.data.seeding). This is q2l's own code written from the package's
behaviour; the package itself no longer runs with NumPy 1.24+ (it uses `np.int`).
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from q2l.utils.errors import ConfigError

OPERATIONS = (
    "invert",
    "cutout",
    "sharpness",
    "autocontrast",
    "posterize",
    "shear_x",
    "translate_x",
    "translate_y",
    "shear_y",
    "rotate",
    "equalize",
    "contrast",
    "color",
    "solarize",
    "brightness",
)
GREY = (128, 128, 128)
CUTOUT_COLOUR = (125, 122, 113)
POSTERIZE_BITS = (8, 8, 7, 7, 6, 6, 5, 5, 4, 4)  # round(linspace(8, 4, 10))
CUTOUT_SIZES = (0, 2, 4, 7, 9, 11, 13, 16, 18, 20)  # round(linspace(0, 20, 10))


class OfficialRandAugment:
    """PIL image -> PIL image: two random operations at random levels, each with probability p.

    Args:
        num_ops: operations drawn per image (2 in the reference).
        probability: chance that each drawn operation is applied (0.5 in the reference).
    """

    def __init__(self, num_ops: int = 2, probability: float = 0.5) -> None:
        self.num_ops = num_ops
        self.probability = probability

    def __call__(self, image: Image.Image) -> Image.Image:
        for _ in range(self.num_ops):
            name = OPERATIONS[int(torch.randint(len(OPERATIONS), ()))]
            level = int(torch.randint(1, 10, ()))
            if float(torch.rand(())) < self.probability:
                sign = 1 if int(torch.randint(2, ())) else -1
                image = apply_operation(image, name, level, sign)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, probability={self.probability})"


def apply_operation(image: Image.Image, name: str, level: int, sign: int = 1) -> Image.Image:
    """Operation `name` at magnitude `level` (0..9); `sign` (±1) for those that go both ways."""
    if name in ("shear_x", "shear_y"):
        shear = sign * _level_value(0.0, 0.3, level)
        matrix = (1, shear, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, shear, 1, 0)
        return image.transform(
            image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC, fillcolor=GREY
        )
    if name in ("translate_x", "translate_y"):
        shift = sign * _level_value(0.0, 150 / 331, level)
        matrix = (
            (1, 0, shift * image.size[0], 0, 1, 0)
            if name == "translate_x"
            else (1, 0, 0, 0, 1, shift * image.size[1])
        )
        return image.transform(image.size, Image.Transform.AFFINE, matrix, fillcolor=GREY)
    if name == "rotate":
        return image.rotate(_level_value(0.0, 30.0, level), fillcolor=GREY)
    if name in ("color", "contrast", "sharpness", "brightness"):
        enhancer = {
            "color": ImageEnhance.Color,
            "contrast": ImageEnhance.Contrast,
            "sharpness": ImageEnhance.Sharpness,
            "brightness": ImageEnhance.Brightness,
        }[name]
        return enhancer(image).enhance(1 + sign * _level_value(0.0, 0.9, level))
    if name == "posterize":
        return ImageOps.posterize(image, POSTERIZE_BITS[level])
    if name == "solarize":
        return ImageOps.solarize(image, _level_value(256.0, 0.0, level))
    if name == "cutout":
        return _cutout(image, CUTOUT_SIZES[level])
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "invert":
        return ImageOps.invert(image)
    raise ConfigError(f"unknown operation {name!r}; choose one of {OPERATIONS}")


def _level_value(start: float, stop: float, level: int) -> float:
    """Entry `level` of numpy.linspace(start, stop, 10), bit for bit (the reference's tables)."""
    return stop if level == 9 else start + level * ((stop - start) / 9)


def _cutout(image: Image.Image, size: int) -> Image.Image:
    """A square of side 2·(size // 2) around a random centre, clipped at the border."""
    width, height = image.size
    center_x, center_y = int(torch.randint(width, ())), int(torch.randint(height, ()))
    half = size // 2
    left, top = max(center_x - half, 0), max(center_y - half, 0)
    right, bottom = min(center_x + half, width), min(center_y + half, height)
    image = image.copy()
    if right > left and bottom > top:
        ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), fill=CUTOUT_COLOUR)
    return image

"""Pictures q2l writes, drawn with Pillow alone: precision-recall grids, labelled image grids,
attention heat maps over images.

Pillow is already a dependency and these are small, fixed layouts; matplotlib would add a large
dependency (and a font cache written at first import) for the same few lines and boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark-blue -> green -> yellow ramp (anchors of viridis), interpolated.
_RAMP = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=np.float32,
)
_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_CURVE = (31, 119, 180)
_GOOD = (0, 130, 0)
_BAD = (200, 0, 0)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    colours = _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction
    return colours.round().astype(np.uint8)


def heatmap_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """`image` with `attention` (h, w) stretched over it (bilinear), coloured and alpha-blended.

    The map is min-max normalised first, so each overlay uses the whole colour range: it shows
    where this label looked, not how peaked its attention was (compare maps by the raw values).
    """
    image = image.convert("RGB")
    attention = attention.astype(np.float32)
    span = float(attention.max() - attention.min())
    normalised = (attention - attention.min()) / span if span > 0 else np.zeros_like(attention)
    resized = Image.fromarray(normalised, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(colorize(np.asarray(resized)))
    return Image.blend(image, colours, alpha)


def captioned(image: Image.Image, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """`image` above a white strip holding `lines` of (text, colour)."""
    font = ImageFont.load_default()
    line_height = _text_height(font) + 3
    width = max(image.width, 8 + max((_text_width(font, t) for t, _ in lines), default=0))
    canvas = Image.new("RGB", (width, image.height + line_height * len(lines) + 4), _BACKGROUND)
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, colour) in enumerate(lines):
        draw.text((3, image.height + 2 + row * line_height), text, fill=colour, font=font)
    return canvas


def grid(images: Sequence[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    """Images in rows of `columns`, each cell as large as the largest image."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    canvas = Image.new(
        "RGB",
        (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap),
        _BACKGROUND,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas.paste(
            image.convert("RGB"), (gap + column * (cell_w + gap), gap + row * (cell_h + gap))
        )
    return canvas


def labelled_images(
    images: Sequence[Image.Image],
    predicted: Sequence[Sequence[str]],
    truth: Sequence[Sequence[str]],
    size: int = 160,
    columns: int = 4,
) -> Image.Image:
    """A grid of images, each captioned with its predicted labels (green when right, red when
    wrong) and the labels it should have had ("missed", red)."""
    cells = []
    for image, guesses, answers in zip(images, predicted, truth, strict=True):
        shown = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        right = [label for label in guesses if label in answers]
        wrong = [label for label in guesses if label not in answers]
        missed = [label for label in answers if label not in guesses]
        lines = [
            ("pred: " + (", ".join(right) or "-"), _GOOD),
            ("wrong: " + (", ".join(wrong) or "-"), _BAD if wrong else _INK),
            ("missed: " + (", ".join(missed) or "-"), _BAD if missed else _INK),
        ]
        cells.append(captioned(shown, [(_fit(text, size), colour) for text, colour in lines]))
    return grid(cells, columns)


def precision_recall_grid(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]],
    columns: int = 5,
    cell: tuple[int, int] = (200, 170),
) -> Image.Image:
    """One small precision-recall plot per class: (name, precision, recall, AP in %) each.

    Axes run 0-1 (recall right, precision up); the curve steps through each distinct score; a
    class without positives shows "no positives".
    """
    font = ImageFont.load_default()
    width, height = cell
    left, top, right, bottom = 30, 18, 8, 22  # margins of the plot area inside a cell
    plots = []
    for name, precision, recall, ap in curves:
        plot = Image.new("RGB", cell, _BACKGROUND)
        draw = ImageDraw.Draw(plot)
        title = f"{name}  AP {ap:.1f}" if math.isfinite(ap) else f"{name}  no positives"
        draw.text((left, 3), _fit(title, width - left), fill=_INK, font=font)
        x0, y0, x1, y1 = left, top, width - right, height - bottom
        draw.rectangle((x0, y0, x1, y1), outline=_INK)
        for tick in (0.0, 0.5, 1.0):
            draw.text((x0 + tick * (x1 - x0) - 6, y1 + 3), f"{tick:g}", fill=_INK, font=font)
            draw.text((4, y1 - tick * (y1 - y0) - 5), f"{tick:g}", fill=_INK, font=font)
        if len(recall) and np.isfinite(recall).all():
            # Start at recall 0 with the first precision, as precision-recall plots usually do.
            xs = np.concatenate([[0.0], recall])
            ys = np.concatenate([[precision[0]], precision])
            points = [
                (x0 + float(x) * (x1 - x0), y1 - float(y) * (y1 - y0))
                for x, y in zip(xs, ys, strict=True)
            ]
            draw.line(points, fill=_CURVE, width=2)
        plots.append(plot)
    return grid(plots, columns, gap=2)


def _fit(text: str, width: int) -> str:
    """`text` cut (with an ellipsis) to about `width` pixels of the default font."""
    most = max(4, width // 6)
    return text if len(text) <= most else text[: most - 3] + "..."


def _text_width(font: ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _text_height(font: ImageFont.ImageFont) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - top)

"""The learning study's chart, drawn with Pillow (q2l has no matplotlib dependency).

Left: final val mAP of every arm, one dot per seed, the mean as a bar and mean ± one standard
deviation as a whisker. Right: learning curves, the mean over seeds per epoch as a line and the
range over seeds as a band. One colour per arm, with a legend underneath.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_COLOURS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
]
_INK, _GRID, _WHITE = (40, 40, 40), (225, 225, 225), (255, 255, 255)
_PANEL_W, _PANEL_H, _MARGIN = 560, 380, 60


def draw_study(curves: dict[str, list[list[float]]], path: Path, subtitle: str = "") -> None:
    """Write the chart to `path` (PNG).

    Args:
        curves: arm title -> one list of per-epoch val mAP per seed (final value last).
        subtitle: a line under the title saying what was run.
    """
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    legend_h = 22 * len(curves) + 10
    width, height = 2 * _PANEL_W + 3 * _MARGIN, _PANEL_H + 2 * _MARGIN + legend_h + 30
    image = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(image)
    draw.text(
        (_MARGIN, 10), "Val mAP by head (final, per seed) and learning curves", fill=_INK, font=font
    )
    draw.text((_MARGIN, 30), subtitle, fill=_INK, font=small)

    values = [v for runs in curves.values() for run in runs for v in run]
    finals = [run[-1] for runs in curves.values() for run in runs]
    low, high = _range(finals, pad=1.0)
    top = _MARGIN + 10
    left_box = (_MARGIN, top, _MARGIN + _PANEL_W, top + _PANEL_H)
    _axes(draw, left_box, low, high, small, "final val mAP")
    slot = _PANEL_W / max(len(curves), 1)
    for index, runs in enumerate(curves.values()):
        colour = _COLOURS[index % len(_COLOURS)]
        centre = left_box[0] + slot * (index + 0.5)
        ends = [run[-1] for run in runs]
        mean = statistics.mean(ends)
        sd = statistics.stdev(ends) if len(ends) > 1 else 0.0
        y = lambda v: _scale(v, low, high, left_box)  # noqa: E731
        draw.rectangle(
            (centre - slot * 0.3, y(mean) - 1, centre + slot * 0.3, y(mean) + 1), fill=colour
        )
        draw.line((centre, y(mean - sd), centre, y(mean + sd)), fill=colour, width=2)
        for cap in (mean - sd, mean + sd):
            draw.line((centre - 6, y(cap), centre + 6, y(cap)), fill=colour, width=2)
        for offset, value in zip(_jitter(len(ends)), ends, strict=True):
            x = centre + offset * slot * 0.2
            draw.ellipse((x - 4, y(value) - 4, x + 4, y(value) + 4), outline=colour, width=2)
        label = f"{index + 1}: {mean:.1f}"
        draw.text(
            (centre - _text_width(small, label) / 2, left_box[3] + 6), label, fill=_INK, font=small
        )

    low, high = _range(values, pad=2.0)
    right_box = (2 * _MARGIN + _PANEL_W, top, 2 * _MARGIN + 2 * _PANEL_W, top + _PANEL_H)
    _axes(draw, right_box, low, high, small, "val mAP")
    epochs = max(len(run) for runs in curves.values() for run in runs)
    x = lambda e: right_box[0] + (e - 1) / max(epochs - 1, 1) * (right_box[2] - right_box[0])  # noqa: E731
    for epoch in range(1, epochs + 1):
        draw.text((x(epoch) - 3, right_box[3] + 6), str(epoch), fill=_INK, font=small)
    draw.text(
        ((right_box[0] + right_box[2]) / 2 - 20, right_box[3] + 22), "epoch", fill=_INK, font=small
    )
    for index, runs in enumerate(curves.values()):
        colour = _COLOURS[index % len(_COLOURS)]
        length = min(len(run) for run in runs)
        columns = [[run[e] for run in runs] for e in range(length)]
        y = lambda v: _scale(v, low, high, right_box)  # noqa: E731
        band = [(x(e + 1), y(max(c))) for e, c in enumerate(columns)]
        band += [(x(e + 1), y(min(c))) for e, c in reversed(list(enumerate(columns)))]
        if len(band) > 2:
            overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
            ImageDraw.Draw(overlay).polygon(band, fill=(*colour, 50))
            image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
            draw = ImageDraw.Draw(image)
        means = [(x(e + 1), y(statistics.mean(c))) for e, c in enumerate(columns)]
        draw.line(means, fill=colour, width=2)
        for point in means:
            draw.ellipse((point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3), fill=colour)

    legend_top = top + _PANEL_H + 45
    for index, (title, runs) in enumerate(curves.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        row = legend_top + 22 * index
        draw.rectangle((_MARGIN, row + 3, _MARGIN + 14, row + 15), fill=colour)
        draw.text(
            (_MARGIN + 22, row),
            f"{index + 1}: {title} ({len(runs)} seed{'' if len(runs) == 1 else 's'})",
            fill=_INK,
            font=font,
        )
    image.save(path)


def _range(values: list[float], pad: float) -> tuple[float, float]:
    """A y range holding `values` with `pad` points of room, on whole numbers."""
    return math.floor(min(values) - pad), math.ceil(max(values) + pad)


def _scale(value: float, low: float, high: float, box: tuple[float, float, float, float]) -> float:
    return box[3] - (value - low) / (high - low) * (box[3] - box[1])


def _axes(draw: ImageDraw.ImageDraw, box, low: float, high: float, font, label: str) -> None:
    """Frame, horizontal grid lines with their values, and the y label."""
    step = _nice_step((high - low) / 6)
    value = math.ceil(low / step) * step
    while value <= high:
        y = _scale(value, low, high, box)
        draw.line((box[0], y, box[2], y), fill=_GRID)
        text = f"{value:g}"
        draw.text((box[0] - 8 - _text_width(font, text), y - 7), text, fill=_INK, font=font)
        value += step
    draw.rectangle(box, outline=_INK)
    draw.text((box[0], box[1] - 18), label, fill=_INK, font=font)


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _jitter(count: int) -> list[float]:
    """Horizontal offsets in [-1, 1] that keep `count` dots apart."""
    return [0.0] if count == 1 else [-1 + 2 * i / (count - 1) for i in range(count)]


def _text_width(font, text: str) -> float:
    left, _, right, _ = font.getbbox(text)
    return right - left

"""Pictures q2l writes, drawn with Pillow alone: labelled image grids, attention heat maps with a
colour bar, and the text and layout pieces they share with the precision-recall plots
(q2l.utils.precision_recall_plot).

Pillow is already a dependency and these are small, fixed layouts; matplotlib would add a large
dependency (and a font cache written at first import) for the same few lines and boxes. Text uses
the scalable font Pillow ships (`ImageFont.load_default(size=...)`, Pillow >= 10.1 with FreeType),
so it is drawn at a size chosen for the picture; without FreeType, Pillow's small bitmap font.
"""

from __future__ import annotations

import functools
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
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
_GOOD = (0, 130, 0)
_BAD = (200, 0, 0)

MIN_BAR_HEIGHT = 160  # pixels

Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.cache
def font(size: int) -> Font:
    """Pillow's bundled scalable font at `size` pixels (its bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    colours = _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction
    return colours.round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Attention maps


def heatmap_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """`image` with `attention` (h, w) stretched over it (bilinear), coloured and alpha-blended.

    The map is min-max normalised first, so each overlay uses the whole colour range: it shows
    where this label looked, not how peaked its attention was; `colour_bar(attention.min(),
    attention.max())` gives the raw values the colours stand for.
    """
    image = image.convert("RGB")
    attention = attention.astype(np.float32)
    span = float(attention.max() - attention.min())
    normalised = (attention - attention.min()) / span if span > 0 else np.zeros_like(attention)
    resized = Image.fromarray(normalised, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(colorize(np.asarray(resized)))
    return Image.blend(image, colours, alpha)


def colour_bar(height: int, low: float, high: float, title: str, font_size: int) -> Image.Image:
    """A vertical colour bar `height` pixels tall: the ramp from `low` (bottom) to `high` (top),
    round values marked where they lie on it, and `title` written upwards beside them."""
    text = font(font_size)
    bar_width = max(12, font_size)
    ramp = colorize(np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None])  # (height, 1, 3)
    # As many values as fit without touching: a tiny image gets its bar's two ends.
    ticks = bar_ticks(low, high, most=max(2, height // round(1.8 * text_height(text))))
    labels = [_number(value) for value in ticks]
    label_width = max(text_width(text, label) for label in labels)
    tick = max(3, font_size // 4)
    title_image = upright_text(title, font_size)
    width = bar_width + tick + 3 + label_width + font_size // 2 + title_image.width
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(Image.fromarray(np.repeat(ramp, bar_width, axis=1)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, bar_width - 1, height - 1), outline=INK)
    for value, label in zip(ticks, labels, strict=True):
        fraction = (value - low) / (high - low) if high > low else 1.0
        y = round((1 - fraction) * (height - 1))
        draw.line((bar_width, y, bar_width + tick, y), fill=INK, width=1)
        text_y = min(max(0, y - text_height(text) // 2), height - text_height(text) - 1)
        draw_text(draw, (bar_width + tick + 3, text_y), label, text, INK)
    title_x = width - title_image.width
    canvas.paste(title_image, (title_x, max(0, (height - title_image.height) // 2)))
    return canvas


def bar_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """Round values (steps of 1, 2 or 5 x 10^n) from `low` to `high`: the largest step that
    gives 4 to `most` of them (else 2 to `most`); the two ends when no round values fit, `high`
    alone when the range is empty."""
    if not high > low:
        return [high]
    top = math.floor(math.log10(high - low))
    steps = [m * 10.0**e for e in range(top, top - 4, -1) for m in (5, 2, 1)]
    for fewest in (min(4, most), 2):
        for step in steps:
            first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
            if fewest <= last - first + 1 <= most:
                return [round(index * step, 12) for index in range(first, last + 1)]
    return [low, high]


def attention_figure(
    overlay: Image.Image, low: float, high: float, caption: str, font_size: int
) -> Image.Image:
    """`overlay` (kept at its size, in the top-left corner) with a colour bar of the attention
    weights `low`..`high` on its right, as tall as the overlay (at least MIN_BAR_HEIGHT, so that
    a small image's bar keeps its values and title), and `caption` below, in `font_size` pixels."""
    gap = max(6, font_size // 2)
    height = max(overlay.height, MIN_BAR_HEIGHT)
    bar = colour_bar(height, low, high, "attention weight", max(12, font_size * 4 // 5))
    canvas = Image.new("RGB", (overlay.width + gap + bar.width, height), BACKGROUND)
    canvas.paste(overlay.convert("RGB"), (0, 0))
    canvas.paste(bar, (overlay.width + gap, 0))
    return captioned(canvas, [(caption, INK)], font_size)


def caption_size(image_size: tuple[int, int]) -> int:
    """A caption's font size for a picture of `image_size`: about 1/28 of its shorter side, at
    least 14 px, so that it reads at the size the picture is looked at."""
    return max(14, round(min(image_size) / 28))


# ---------------------------------------------------------------------------------------------
# Captions and grids


def captioned(
    image: Image.Image,
    lines: Sequence[tuple[str, Colour]],
    font_size: int = 14,
) -> Image.Image:
    """`image` above a white strip holding `lines` of (text, colour) in `font_size` pixels."""
    text = font(font_size)
    line_height = text_height(text) + max(3, font_size // 4)
    margin = max(3, font_size // 4)
    width = max(image.width, 2 * margin + max((text_width(text, t) for t, _ in lines), default=0))
    strip = line_height * len(lines) + 2 * margin
    canvas = Image.new("RGB", (width, image.height + strip), BACKGROUND)
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (line, colour) in enumerate(lines):
        draw_text(draw, (margin, image.height + margin + row * line_height), line, text, colour)
    return canvas


def grid(images: Sequence[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    """Images in rows of `columns`, each cell as large as the largest image, each image at the
    top of its cell, centred across it."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    canvas = Image.new(
        "RGB",
        (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap),
        BACKGROUND,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        left = gap + column * (cell_w + gap) + (cell_w - image.width) // 2
        canvas.paste(image.convert("RGB"), (left, gap + row * (cell_h + gap)))
    return canvas


def labelled_images(
    images: Sequence[Image.Image],
    predicted: Sequence[Sequence[str]],
    truth: Sequence[Sequence[str]],
    size: int = 224,
    columns: int = 4,
    font_size: int = 15,
) -> Image.Image:
    """A grid of images, each captioned with its predicted labels (green when right, red when
    wrong) and the labels it should have had ("missed", red). Long lists wrap onto up to three
    lines of the image's width, then end with "+N more"."""
    text = font(font_size)
    cells = []
    for image, guesses, answers in zip(images, predicted, truth, strict=True):
        shown = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        right = [label for label in guesses if label in answers]
        wrong = [label for label in guesses if label not in answers]
        missed = [label for label in answers if label not in guesses]
        lines = []
        for title, labels, colour in (
            ("right", right, _GOOD if right else INK),
            ("wrong", wrong, _BAD if wrong else INK),
            ("missed", missed, _BAD if missed else INK),
        ):
            wrapped = wrap_words(f"{title}: ", labels, text, size - 8, max_lines=3)
            lines += [(line, colour) for line in wrapped]
        cells.append(captioned(shown, lines, font_size))
    return grid(cells, columns, gap=6)


# ---------------------------------------------------------------------------------------------
# Text


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, face: Font, colour: Colour
) -> None:
    """`text` with the top of its capitals at `xy`, whatever letters it holds (Pillow places the
    font's ascender line there, which leaves a size-dependent blank above the letters)."""
    _, top, _, _ = face.getbbox("Ag")
    draw.text((xy[0], xy[1] - top), text, fill=colour, font=face)


def upright_text(text: str, font_size: int) -> Image.Image:
    """`text` written bottom to top (a y-axis label), on white."""
    face = font(font_size)
    flat = Image.new("RGB", (text_width(face, text) + 2, text_height(face) + 4), BACKGROUND)
    draw_text(ImageDraw.Draw(flat), (1, 1), text, face, INK)
    return flat.rotate(90, expand=True)


def wrap_words(
    prefix: str, words: Sequence[str], face: Font, width: int, max_lines: int
) -> list[str]:
    """`prefix` and `words` joined by ", " in lines of at most `width` pixels (a word wider than
    a line is cut); words that do not fit in `max_lines` lines are counted as "+N more" at the
    end of the last. No words: `prefix` and "-"."""
    if not words:
        return [prefix + "-"]
    lines: list[list[str]] = [[]]
    for word in words:
        # A line that goes on ends with a comma: leave room for it.
        if lines[-1] and text_width(face, _line(prefix, lines, [*lines[-1], word]) + ",") > width:
            lines.append([])
        lines[-1].append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        shown = sum(len(line) for line in lines)
        # Make room on the last line for the count of the words left out.
        while len(lines[-1]) > 1 and (
            text_width(face, _line(prefix, lines, lines[-1]) + f", +{len(words) - shown} more")
            > width
        ):
            lines[-1].pop()
            shown -= 1
        lines[-1].append(f"+{len(words) - shown} more")
    texts = [_line(prefix, lines[: index + 1], line) for index, line in enumerate(lines)]
    return [
        fit(text + ("," if index < len(texts) - 1 else ""), face, width)
        for index, text in enumerate(texts)
    ]


def _line(prefix: str, lines: list[list[str]], words: list[str]) -> str:
    """One wrapped line: the first starts with `prefix`, the others are indented."""
    return (prefix if len(lines) == 1 else "  ") + ", ".join(words)


def fit(text: str, face: Font, width: int) -> str:
    """`text`, cut with an ellipsis to at most `width` pixels."""
    if text_width(face, text) <= width:
        return text
    while len(text) > 1 and text_width(face, text + "...") > width:
        text = text[:-1]
    return text + "..."


def _number(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def text_width(face: Font, text: str) -> int:
    """Pixels `text` spans across in `face`."""
    left, _, right, _ = face.getbbox(text)
    return int(right - left)


def text_height(face: Font) -> int:
    """Pixels from the top of a capital to the bottom of a descender in `face`."""
    _, top, _, bottom = face.getbbox("Ag")
    return int(bottom - top)

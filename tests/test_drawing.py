"""Pictures (q2l.utils.drawing, q2l.utils.precision_recall_plot): precision-recall plots mark
their operating points where the thresholds put them, with a legend; attention figures carry a
colour bar with round values; captions are drawn large enough to read, and long label lists wrap
instead of vanishing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from q2l.utils.drawing import (
    MIN_BAR_HEIGHT,
    attention_figure,
    bar_ticks,
    caption_size,
    colorize,
    font,
    heatmap_overlay,
    labelled_images,
    text_width,
    wrap_words,
)
from q2l.utils.precision_recall_plot import (
    CALIBRATED_MARKER,
    RUN_MARKER,
    OperatingPoint,
    PrecisionRecallGrid,
    PRPanel,
)


def _close(pixel, colour, tolerance=12):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour, strict=True))


def test_the_operating_points_are_marked_on_the_curve_with_a_legend():
    curve = (np.array([1.0, 0.8, 0.6, 0.5]), np.array([0.25, 0.5, 0.75, 1.0]))
    run = OperatingPoint(threshold=0.5, precision=0.6, recall=0.75, predicted=5)
    calibrated = OperatingPoint(threshold=0.8, precision=1.0, recall=0.25, predicted=1)
    panels = [
        PRPanel("cat", *curve, 81.2, run_point=run, calibrated_point=calibrated),
        PRPanel("dog", *curve, 70.0, run_point=run),
        PRPanel("none", np.array([0.0]), np.array([np.nan]), float("nan")),
    ]
    figure = PrecisionRecallGrid(panels, columns=2, run_threshold=0.5)
    image = figure.draw()
    width, height = figure.cell
    assert image.width >= 2 * width and image.height >= 2 * height + figure.legend_height
    assert _close(image.getpixel(figure.point(0, 0.75, 0.6)), RUN_MARKER)
    assert _close(image.getpixel(figure.point(0, 0.25, 1.0)), CALIBRATED_MARKER)
    assert _close(image.getpixel(figure.point(1, 0.75, 0.6)), RUN_MARKER)
    assert not _close(image.getpixel(figure.point(1, 0.25, 1.0)), CALIBRATED_MARKER)
    # The legend shows both markers: a disc and a diamond in the strip above the plots.
    legend = np.asarray(image.crop((0, 0, image.width, figure.legend_height)))
    for colour in (RUN_MARKER, CALIBRATED_MARKER):
        assert (np.abs(legend.astype(int) - colour).max(axis=-1) <= 12).any()


def test_nothing_predicted_is_marked_at_the_curves_start():
    curve = (np.array([1.0, 0.5]), np.array([0.5, 1.0]))
    nothing = OperatingPoint(threshold=0.9, precision=0.0, recall=0.0, predicted=0)
    figure = PrecisionRecallGrid([PRPanel("rare", *curve, 75.0, run_point=nothing)])
    assert _close(figure.draw().getpixel(figure.point(0, 0.0, 1.0)), RUN_MARKER)


def test_the_attention_figure_keeps_the_overlay_and_adds_a_colour_bar():
    image = Image.new("RGB", (300, 200), (128, 128, 128))
    attention = np.array([[0.01, 0.02], [0.03, 0.2]], dtype=np.float32)
    overlay = heatmap_overlay(image, attention, alpha=0.5)
    figure = attention_figure(overlay, 0.01, 0.2, "cat  (score 0.912)", caption_size(image.size))
    assert figure.crop((0, 0, 300, 200)).tobytes() == overlay.tobytes()
    assert figure.width > 300 + 40 and figure.height > 200 + 14  # the bar, and the caption
    # The bar: the ramp's top colour at its top, its bottom colour at its bottom.
    bar = np.asarray(figure.crop((300, 0, figure.width, 200))).astype(int)
    top, bottom = bar[2], bar[-3]
    highest, lowest = colorize(np.array([1.0, 0.0]))
    assert (np.abs(top - highest).max(axis=-1) <= 12).any()
    assert (np.abs(bottom - lowest).max(axis=-1) <= 12).any()
    small = attention_figure(overlay.resize((48, 40)), 0.01, 0.2, "cat", 14)
    assert small.height >= MIN_BAR_HEIGHT  # a bar tall enough for its values and title


def test_colour_bar_values_are_round_and_within_the_maps_range():
    assert bar_ticks(0.0602, 0.647) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert bar_ticks(0.001, 0.05) == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert bar_ticks(0.0, 1.0, most=3) == [0.0, 0.5, 1.0]
    assert bar_ticks(0.25, 0.25) == [0.25]  # a flat map
    assert bar_ticks(0.1, 0.3, most=2) == [0.1, 0.3]


def test_text_is_drawn_at_a_readable_size():
    if not isinstance(font(15), ImageFont.FreeTypeFont):
        pytest.skip("Pillow without FreeType draws its one bitmap size")
    _, top, _, bottom = font(15).getbbox("Ag")
    assert bottom - top >= 13
    assert caption_size((320, 240)) == 14 and caption_size((4000, 3000)) == 107


def test_long_label_lists_wrap_and_count_what_is_left_out():
    names = [f"label number {k}" for k in range(30)]
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    short = labelled_images([image], [["a"]], [["a"]], size=224)
    many = labelled_images([image], [names], [[]], size=224)
    assert many.height > short.height + 2 * 15  # three lines for the wrong labels
    assert many.width == short.width  # wrapped to the image's width


def test_wrapped_words_are_all_shown_or_counted():
    face, words = font(15), [f"class {k}" for k in range(12)]
    lines = wrap_words("wrong: ", words, face, 224, max_lines=10)
    assert len(lines) > 1 and all(text_width(face, line) <= 224 for line in lines)
    assert " ".join(lines).replace(",", "").split()[1:] == " ".join(words).split()
    cut = wrap_words("wrong: ", words, face, 224, max_lines=2)
    shown = sum(line.count("class") for line in cut)
    assert len(cut) == 2 and cut[-1].endswith(f"+{len(words) - shown} more")
    assert wrap_words("missed: ", [], face, 224, 3) == ["missed: -"]

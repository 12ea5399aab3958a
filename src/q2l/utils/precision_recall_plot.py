"""Precision-recall plots, one per class in a grid, each curve marked at its operating points:
where the run's threshold and the class's calibrated threshold put it (eval's pr_curves.png,
q2l.evaluation.reports). Drawn with Pillow, as q2l.utils.drawing explains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from q2l.utils.drawing import (
    BACKGROUND,
    INK,
    Colour,
    draw_text,
    fit,
    font,
    text_height,
    text_width,
    upright_text,
)

RUN_MARKER = (255, 127, 14)  # orange disc: the operating point at the run's threshold
CALIBRATED_MARKER = (214, 39, 40)  # red diamond: at the class's calibrated threshold
_FAINT = (225, 225, 225)  # grid lines
_CURVE = (31, 119, 180)


@dataclass(frozen=True)
class OperatingPoint:
    """Where a threshold puts a class on its precision-recall curve (a vertex of it when
    anything is predicted; `predicted` 0 means nothing reaches the threshold)."""

    threshold: float
    precision: float
    recall: float
    predicted: int


@dataclass(frozen=True)
class PRPanel:
    """One class's plot: its curve (T,) arrays, AP in percent (NaN: no positives) and the
    operating points at the run's threshold and at the class's calibrated one (if any)."""

    name: str
    precision: np.ndarray
    recall: np.ndarray
    average_precision: float
    run_point: OperatingPoint | None = None
    calibrated_point: OperatingPoint | None = None


class PrecisionRecallGrid:
    """One precision-recall plot per class in a grid, under a legend of the markers.

    Each plot: recall on x and precision on y, both 0-1 with ticks every 0.2 and light grid
    lines; the curve steps through each distinct score; an orange disc at the run's threshold
    and a red diamond at the calibrated one, with their thresholds, precision and recall written
    under the title "<class>  AP <ap>". A class without positives shows "no positives".
    """

    cell = (320, 310)  # width, height of each plot
    gap = 10
    # The plot area inside a cell: left, top, right, bottom margins.
    margins = (54, 74, 14, 46)

    def __init__(
        self, panels: Sequence[PRPanel], columns: int = 5, run_threshold: float | None = None
    ) -> None:
        self.panels = list(panels)
        self.columns = max(1, min(columns, len(self.panels)))
        self.run_threshold = run_threshold
        self.legend_height = 40

    def point(self, index: int, recall: float, precision: float) -> tuple[int, int]:
        """The pixel (x, y) of (recall, precision) in the plot of panel `index`."""
        row, column = divmod(index, self.columns)
        x0, y0, x1, y1 = self._plot_box()
        left = self.gap + column * (self.cell[0] + self.gap)
        top = self.legend_height + self.gap + row * (self.cell[1] + self.gap)
        return (
            left + round(x0 + recall * (x1 - x0)),
            top + round(y1 - precision * (y1 - y0)),
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the drawn picture."""
        rows = math.ceil(len(self.panels) / self.columns)
        width = self.columns * (self.cell[0] + self.gap) + self.gap
        return width, self.legend_height + rows * (self.cell[1] + self.gap) + self.gap

    def draw(self) -> Image.Image:
        canvas = Image.new("RGB", self.size, BACKGROUND)
        self._draw_legend(ImageDraw.Draw(canvas))
        for index, panel in enumerate(self.panels):
            row, column = divmod(index, self.columns)
            left = self.gap + column * (self.cell[0] + self.gap)
            top = self.legend_height + self.gap + row * (self.cell[1] + self.gap)
            canvas.paste(self._draw_panel(panel), (left, top))
        return canvas

    def _plot_box(self) -> tuple[int, int, int, int]:
        left, top, right, bottom = self.margins
        return left, top, self.cell[0] - right, self.cell[1] - bottom

    def _draw_legend(self, draw: ImageDraw.ImageDraw) -> None:
        text = font(15)
        run = "operating point (precision P, recall R) at the run's threshold t"
        if self.run_threshold is not None:
            run += f"={self.run_threshold:g}"
        entries = [(_disc, RUN_MARKER, run)]
        if any(panel.calibrated_point for panel in self.panels):
            entries.append((_diamond, CALIBRATED_MARKER, "at the class's calibrated threshold t"))
        x, y = 14, self.legend_height // 2
        for shape, colour, label in entries:
            shape(draw, (x, y), 6, colour)
            draw_text(draw, (x + 12, y - text_height(text) // 2 - 1), label, text, INK)
            x += 12 + text_width(text, label) + 30

    def _draw_panel(self, panel: PRPanel) -> Image.Image:
        plot = Image.new("RGB", self.cell, BACKGROUND)
        draw = ImageDraw.Draw(plot)
        x0, y0, x1, y1 = self._plot_box()
        has_curve = len(panel.recall) > 0 and bool(np.isfinite(panel.recall).all())
        title = f"{panel.name}  AP {panel.average_precision:.1f}" if has_curve else panel.name
        draw_text(draw, (8, 6), fit(title, font(17), self.cell[0] - 12), font(17), INK)
        self._draw_axes(plot, draw)
        if not has_curve:
            message = "no positives"
            width = text_width(font(15), message)
            draw_text(draw, ((x0 + x1 - width) // 2, (y0 + y1) // 2 - 8), message, font(15), INK)
            return plot
        # Start at recall 0 with the first precision, as precision-recall plots usually do.
        xs = np.concatenate([[0.0], panel.recall])
        ys = np.concatenate([[panel.precision[0]], panel.precision])
        points = [self._pixel(x, y) for x, y in zip(xs, ys, strict=True)]
        draw.line(points, fill=_CURVE, width=2)
        notes = [
            (point, shape, colour)
            for point, shape, colour in (
                (panel.run_point, _disc, RUN_MARKER),
                (panel.calibrated_point, _diamond, CALIBRATED_MARKER),
            )
            if point is not None
        ]
        for row, (point, shape, colour) in enumerate(notes):
            # Nothing predicted: the curve's start, where predicting more would begin.
            where = (point.recall, point.precision) if point.predicted else (0.0, ys[0])
            shape(draw, self._pixel(*where), 6, colour)
            y = 30 + row * 20
            shape(draw, (14, y + 8), 5, colour)
            draw_text(draw, (24, y), _point_text(point), font(14), INK)
        return plot

    def _draw_axes(self, plot: Image.Image, draw: ImageDraw.ImageDraw) -> None:
        x0, y0, x1, y1 = self._plot_box()
        ticks = font(13)
        for step in range(6):
            value = step / 5
            x, y = self._pixel(value, value)
            if 0 < step < 5:
                draw.line((x, y0, x, y1), fill=_FAINT)
                draw.line((x0, y, x1, y), fill=_FAINT)
            draw.line((x, y1, x, y1 + 4), fill=INK)
            draw.line((x0 - 4, y, x0, y), fill=INK)
            label = f"{value:.1f}"
            width = text_width(ticks, label)
            draw_text(draw, (x - width // 2, y1 + 6), label, ticks, INK)
            draw_text(draw, (x0 - 7 - width, y - text_height(ticks) // 2 - 1), label, ticks, INK)
        draw.rectangle((x0, y0, x1, y1), outline=INK)
        axis = font(14)
        width = text_width(axis, "recall")
        draw_text(draw, ((x0 + x1 - width) // 2, y1 + 24), "recall", axis, INK)
        upright = upright_text("precision", 14)
        plot.paste(upright, (4, (y0 + y1 - upright.height) // 2))

    def _pixel(self, recall: float, precision: float) -> tuple[int, int]:
        x0, y0, x1, y1 = self._plot_box()
        return round(x0 + float(recall) * (x1 - x0)), round(y1 - float(precision) * (y1 - y0))


def _point_text(point: OperatingPoint) -> str:
    if not point.predicted:
        return f"t={point.threshold:.3g}: none predicted"
    return f"t={point.threshold:.3g}: P {point.precision:.2f}, R {point.recall:.2f}"


def _disc(draw: ImageDraw.ImageDraw, centre: tuple[int, int], radius: int, colour: Colour) -> None:
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=INK)


def _diamond(
    draw: ImageDraw.ImageDraw, centre: tuple[int, int], radius: int, colour: Colour
) -> None:
    x, y = centre
    radius += 1  # a diamond looks smaller than a disc of the same radius
    corners = [(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)]
    draw.polygon(corners, fill=colour, outline=INK)

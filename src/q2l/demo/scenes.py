"""Cluttered scenes of small digits, rendered in memory: where Query2Label's attention should pay.

A scene is a large canvas (160 px by default, so a stride-32 backbone gives a 5x5 feature map) on
which 1-4 handwritten digits of 14-28 px are the labelled objects, each covering about one of the
feature map's cells, among unlabelled distractors of the same size and look: strokes, rings,
filled blobs, and "scrambled glyphs" (a digit scan with its quadrants shuffled and mirrored: digit
texture, no digit). Backgrounds are colour gradients with pixel noise. Global pooling sees one
average over all cells, most of them clutter; label queries can pick the few cells that matter,
which is the regime the Query2Label paper argues for (arXiv 2107.10834, its attention maps).

`render_crops` renders single-object crops of the same family (one digit, or only distractors:
an 11th "no digit" class) for pretraining a backbone, the way ImageNet weights precede COCO.
Train and val draw digits from disjoint scan pools (`q2l.demo.digits.split_digit_scans`).
benchmarks/head_study.py uses both; docs/heads.md has its results.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from q2l.demo.digits import split_digit_scans

NUM_CLASSES = 10  # the digits; render_crops adds NO_DIGIT
NO_DIGIT = 10


def render_scenes(
    num_images: int,
    split: str = "train",
    size: int = 160,
    objects: tuple[int, int] = (1, 4),
    object_px: tuple[int, int] = (14, 28),
    distractors: tuple[int, int] = (4, 10),
    noise: float = 0.03,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` scenes: uint8 images (N, 3, size, size) and float targets (N, 10) in {0, 1}.

    Args:
        split: "train" or "val": which scan pool the digits come from (disjoint pools).
        objects: least and most labelled digits per scene (inclusive).
        object_px: least and most side of a digit, in pixels.
        distractors: least and most unlabelled distractors per scene.
        noise: standard deviation of the Gaussian pixel noise (intensities in [0, 1]).
        seed: the scenes are a function of (seed, split) alone.
    """
    painter = _Painter(size, split, seed, stream=1)
    images = torch.empty(num_images, 3, size, size, dtype=torch.uint8)
    targets = torch.zeros(num_images, NUM_CLASSES)
    for index in range(num_images):
        canvas = painter.background()
        boxes: list[tuple[int, int, int]] = []
        count = painter.integer(*distractors)
        # Distractors first, then digits (kept apart from each other), then a few more
        # distractors on top so that clutter also crosses the digits.
        below = count - count // 3
        for _ in range(below):
            canvas = painter.distractor(canvas, object_px)
        for _ in range(painter.integer(*objects)):
            placed = painter.digit(canvas, object_px, boxes)
            if placed is not None:
                canvas, label = placed
                targets[index, label] = 1.0
        for _ in range(count - below):
            canvas = painter.distractor(canvas, object_px)
        images[index] = painter.finish(canvas, noise)
    return images, targets


def render_crops(
    num_images: int,
    size: int = 48,
    object_px: tuple[int, int] = (14, 28),
    distractors: tuple[int, int] = (0, 2),
    no_digit_fraction: float = 0.1,
    noise: float = 0.03,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-object crops from the train pool: uint8 images (N, 3, size, size) and int64 labels
    (N,), the digit, or NO_DIGIT (10) for a crop holding only distractors."""
    painter = _Painter(size, "train", seed, stream=2)
    images = torch.empty(num_images, 3, size, size, dtype=torch.uint8)
    labels = torch.full((num_images,), NO_DIGIT, dtype=torch.int64)
    for index in range(num_images):
        canvas = painter.background()
        empty = painter.rng.random() < no_digit_fraction
        for _ in range(painter.integer(*distractors) + (1 if empty else 0)):
            canvas = painter.distractor(canvas, object_px)
        if not empty:
            placed = painter.digit(canvas, object_px, [])
            if placed is not None:
                canvas, labels[index] = placed
        images[index] = painter.finish(canvas, noise)
    return images, labels


class _Painter:
    """Draws the parts of canvases of side `size` from one seeded random stream."""

    def __init__(self, size: int, split: str, seed: int, stream: int) -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        pool = split_digit_scans(seed)[0 if split == "train" else 1]
        scans = load_digits()
        self.glyphs = torch.from_numpy(scans.images[pool]).float().unsqueeze(1) / 16  # (P,1,8,8)
        self.labels = scans.target[pool]
        self.size = size
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, stream, split == "val"]))
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        self.ys, self.xs = torch.meshgrid(grid, grid, indexing="ij")

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def background(self) -> torch.Tensor:
        """A colour gradient in a random direction: (3, S, S) in [0, 1]."""
        rng = self.rng
        base = torch.from_numpy(rng.uniform(0.0, 0.4, 3)).float()
        tilt = torch.from_numpy(rng.uniform(-0.2, 0.2, 3)).float()
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * self.xs + math.sin(angle) * self.ys) / self.size - 0.5
        return (base[:, None, None] + tilt[:, None, None] * ramp).clamp(0, 1)

    def colour(self, canvas: torch.Tensor) -> torch.Tensor:
        """A random colour that stands out from the canvas's mean."""
        colour = torch.from_numpy(self.rng.uniform(0.3, 1.0, 3)).float()
        if float((colour - canvas.mean((1, 2))).abs().max()) < 0.3:
            colour = (colour + 0.4).clamp(0, 1)
        return colour

    def digit(
        self, canvas: torch.Tensor, object_px: tuple[int, int], boxes: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, int] | None:
        """`canvas` with one digit painted where it overlaps no box in `boxes` by more than a
        tenth of its area, and its label; None when no such place was found."""
        side = self.integer(*object_px)
        for _attempt in range(30):
            top, left = (self.integer(0, self.size - side) for _ in range(2))
            if all(_overlap((top, left, side), box) <= 0.1 * side * side for box in boxes):
                break
        else:
            return None
        boxes.append((top, left, side))
        pick = int(self.rng.integers(len(self.glyphs)))
        glyph = self._resize(self.glyphs[pick], side)
        return self._paste(canvas, glyph, top, left, self.colour(canvas)), int(self.labels[pick])

    def distractor(self, canvas: torch.Tensor, object_px: tuple[int, int]) -> torch.Tensor:
        """`canvas` with one unlabelled thing of about a digit's size painted on it."""
        kind = self.rng.choice(("stroke", "ring", "blob", "scrambled"), p=(0.3, 0.2, 0.2, 0.3))
        side = self.integer(*object_px)
        top, left = (self.integer(0, self.size - side) for _ in range(2))
        colour = self.colour(canvas)
        if kind == "scrambled":
            glyph = self.glyphs[int(self.rng.integers(len(self.glyphs)))][0]
            quadrants = [glyph[:4, :4], glyph[:4, 4:], glyph[4:, :4], glyph[4:, 4:]]
            order = self.rng.permutation(4)
            quadrants = [
                quadrants[i].flip(int(self.rng.integers(2)))
                if self.rng.random() < 0.5
                else quadrants[i]
                for i in order
            ]
            scrambled = torch.cat(
                (torch.cat(quadrants[:2], 1), torch.cat(quadrants[2:], 1)), 0
            ).unsqueeze(0)
            return self._paste(canvas, self._resize(scrambled, side), top, left, colour)
        # Drawn in the box plus a margin, not over the whole canvas: rendering stays cheap.
        y0, x0 = max(top - 2, 0), max(left - 2, 0)
        ys = self.ys[y0 : top + side + 2, x0 : left + side + 2]
        xs = self.xs[y0 : top + side + 2, x0 : left + side + 2]
        centre_y, centre_x = top + side / 2, left + side / 2
        distance = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2).sqrt()
        if kind == "ring":
            width = self.rng.uniform(1.0, 2.5)
            alpha = (width / 2 + 0.5 - (distance - side * 0.35).abs()).clamp(0, 1)
        elif kind == "blob":
            alpha = (side * self.rng.uniform(0.2, 0.4) + 0.5 - distance).clamp(0, 1)
        else:  # a straight stroke across the box, in a random direction
            angle = self.rng.uniform(0, math.pi)
            dy, dx = math.sin(angle) * side, math.cos(angle) * side
            start_y, start_x = centre_y - dy / 2, centre_x - dx / 2
            t = (((ys - start_y) * dy + (xs - start_x) * dx) / (side * side)).clamp(0, 1)
            across = ((ys - start_y - t * dy) ** 2 + (xs - start_x - t * dx) ** 2).sqrt()
            alpha = (self.rng.uniform(1.0, 2.5) / 2 + 0.5 - across).clamp(0, 1)
        return self._paste(canvas, alpha, y0, x0, colour)

    def finish(self, canvas: torch.Tensor, noise: float) -> torch.Tensor:
        """Add pixel noise; uint8 (3, S, S)."""
        canvas = canvas + torch.from_numpy(self.rng.normal(0, noise, canvas.shape)).float()
        return (canvas.clamp(0, 1) * 255).round().to(torch.uint8)

    @staticmethod
    def _resize(glyph: torch.Tensor, side: int) -> torch.Tensor:
        """(1, 8, 8) ink in [0, 1] -> (side, side)."""
        resized = F.interpolate(glyph[None], size=(side, side), mode="bicubic", align_corners=False)
        return resized.clamp(0, 1)[0, 0]

    @staticmethod
    def _paste(
        canvas: torch.Tensor, alpha: torch.Tensor, top: int, left: int, colour: torch.Tensor
    ) -> torch.Tensor:
        """`canvas` with `colour` blended in by the (h, w) `alpha` whose corner is (top, left)."""
        height, width = alpha.shape
        canvas = canvas.clone()
        window = canvas[:, top : top + height, left : left + width]
        window += alpha[None] * (colour[:, None, None] - window)
        return canvas


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Overlapping area of two squares given as (top, left, side)."""
    height = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    width = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return height * width

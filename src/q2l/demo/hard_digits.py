"""A harder digits task, rendered in memory: for comparing heads, not for the demo run.

Unlike the demo's canvases (1-4 digits in separate grid cells on a plain background), digits here
are placed freely with partial overlap (later digits paint over earlier ones), with varying
contrast, over a colour gradient, among distractor strokes and rings, with pixel noise. Train
canvases use only the train pool of `split_digit_scans`, val canvases only the val pool.
docs/heads.md uses it to compare Query2Label with global pooling + linear.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from q2l.demo.digits import split_digit_scans


def hard_digits(
    num_train: int,
    num_val: int,
    size: int = 32,
    digits: tuple[int, int] = (1, 3),
    digit_px: tuple[int, int] = (12, 16),
    strokes: tuple[int, int] = (0, 2),
    ring_probability: float = 0.1,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train targets, val images, val targets): uint8 (N, 3, S, S), float (N, 10)."""
    from sklearn.datasets import load_digits

    scans = load_digits()
    splits = []
    pools = zip(split_digit_scans(seed), (num_train, num_val), strict=True)
    for split, (pool, count) in enumerate(pools):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 200 + split]))
        canvas = _Canvas(size, rng)
        splits += canvas.render(
            count,
            scans.images[pool],
            scans.target[pool],
            digits,
            digit_px,
            strokes,
            ring_probability,
            noise,
        )
    return tuple(splits)


class _Canvas:
    """Draws canvases of side `size` with the generator `rng`."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        self.ys, self.xs = torch.meshgrid(grid, grid, indexing="ij")

    def render(self, count, scans, labels, digits, digit_px, strokes, ring_probability, noise):
        rng, size = self.rng, self.size
        images = torch.empty(count, 3, size, size, dtype=torch.uint8)
        targets = torch.zeros(count, 10)
        glyphs = torch.from_numpy(scans).float().unsqueeze(1) / 16.0  # (P, 1, 8, 8)
        for index in range(count):
            canvas = self._background()
            clutter = [self._stroke() for _ in range(int(rng.integers(strokes[0], strokes[1] + 1)))]
            on_top = rng.random(len(clutter)) < 0.5  # half the strokes cross the digits
            for (alpha, colour), top in zip(clutter, on_top, strict=True):
                canvas = canvas if top else _paint(canvas, alpha, colour)
            for pick, alpha in self._digits(
                glyphs, int(rng.integers(digits[0], digits[1] + 1)), digit_px
            ):
                colour = torch.from_numpy(rng.uniform(0.3, 1.0, 3)).float()
                if float((colour - canvas.mean()).abs().max()) < 0.25:  # keep faint digits visible
                    colour = (colour + 0.35).clamp(0, 1)
                canvas = _paint(canvas, alpha, colour)
                targets[index, int(labels[pick])] = 1.0
            for (alpha, colour), top in zip(clutter, on_top, strict=True):
                canvas = _paint(canvas, alpha, colour) if top else canvas
            if rng.random() < ring_probability:  # looks like part of a 0, 6, 8 or 9
                canvas = _paint(canvas, *self._ring())
            canvas = canvas + torch.from_numpy(rng.normal(0, noise, canvas.shape)).float()
            images[index] = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
        return images, targets

    def _background(self) -> torch.Tensor:
        rng = self.rng
        base = torch.from_numpy(rng.uniform(0.0, 0.35, 3)).float()
        tilt = torch.from_numpy(rng.uniform(-0.15, 0.15, 3)).float()
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * self.xs + math.sin(angle) * self.ys) / self.size - 0.5
        return (base[:, None, None] + tilt[:, None, None] * ramp).clamp(0, 1)  # (3, S, S)

    def _stroke(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng, size = self.rng, self.size
        start = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.12, 0.4) * size
        end = start + length * np.array([math.sin(angle), math.cos(angle)])
        (y0, x0), (y1, x1), width = start, end, rng.uniform(0.8, 1.8)
        dy, dx = y1 - y0, x1 - x0
        t = (((self.ys - y0) * dy + (self.xs - x0) * dx) / (dy * dy + dx * dx + 1e-6)).clamp(0, 1)
        distance = ((self.ys - (y0 + t * dy)) ** 2 + (self.xs - (x0 + t * dx)) ** 2).sqrt()
        return (width / 2 + 0.5 - distance).clamp(0, 1), torch.from_numpy(
            rng.uniform(0.35, 1, 3)
        ).float()

    def _ring(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng, size = self.rng, self.size
        centre, radius = rng.uniform(4, size - 4, 2), rng.uniform(0.05, 0.1) * size
        width = rng.uniform(0.8, 1.5)
        distance = ((self.ys - centre[0]) ** 2 + (self.xs - centre[1]) ** 2).sqrt()
        alpha = (width / 2 + 0.5 - (distance - radius).abs()).clamp(0, 1)
        return alpha, torch.from_numpy(rng.uniform(0.35, 1.0, 3)).float()

    def _digits(
        self, glyphs: torch.Tensor, count: int, digit_px: tuple[int, int], max_overlap=0.25
    ):
        """(scan index, alpha (S, S)) of up to `count` digits overlapping at most `max_overlap`."""
        rng, size, boxes = self.rng, self.size, []
        for _ in range(count):
            side = int(rng.integers(digit_px[0], digit_px[1] + 1))
            for _attempt in range(40):
                top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
                if all(
                    _overlap((top, left, side), box) <= max_overlap * min(side, box[2]) ** 2
                    for box in boxes
                ):
                    break
            else:
                continue
            pick = int(rng.integers(len(glyphs)))
            glyph = F.interpolate(
                glyphs[pick : pick + 1], size=(side, side), mode="bicubic", align_corners=False
            ).clamp(0, 1)[0, 0]
            alpha = torch.zeros(size, size)
            alpha[top : top + side, left : left + side] = glyph
            boxes.append((top, left, side))
            yield pick, alpha


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    height = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    width = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return height * width


def _paint(canvas: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    return canvas + alpha[None] * (colour[:, None, None] - canvas)

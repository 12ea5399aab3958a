"""Attention-map entry point: where the top labels of one image looked.

    q2l-attention ckpt=outputs/.../checkpoints/best.pt image=photo.jpg output=maps/ [top_k=3]

For each of the `top_k` highest-scoring labels, writes `<rank>-<label>.png`: the last decoder
layer's cross-attention of that label's query over the feature grid (q2l.models.attention_maps),
averaged over heads, upsampled to the image's own size (bilinear), coloured and alpha-blended
over it (kept at the image's size in the top-left corner), with a colour bar of the attention
weights on its right and the label and score below, in a font sized for the image; and
`grid.png` with the image and every overlay the same way at thumbnail size. The model sees the
image as prediction does (square resize), so the map covers the whole image. `output` must be a
new or empty folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from q2l.data.dataset import load_rgb
from q2l.data.transforms import build_eval_transform
from q2l.inference.model_info import ModelInfo
from q2l.models.attention_maps import CrossAttentionMaps
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.utils import dist
from q2l.utils.drawing import attention_figure, caption_size, captioned, grid, heatmap_overlay

log = logging.getLogger("q2l.inference.attention")

_GRID_CELL = 320  # longest side of each picture in grid.png
_GRID_FONT = 17  # caption size in grid.png, in pixels
_INK = (40, 40, 40)


def write_attention_maps(cfg: DictConfig) -> list[Path]:
    """Write the overlays and grid.png for `cfg.image` into `cfg.output`; returns the overlays."""
    folder = _new_folder(cfg.output)
    # BadImageError names an unreadable file, or one larger than max_image_pixels
    image = load_rgb(
        Path(cfg.image).expanduser(),
        max_pixels=cfg.max_image_pixels,
        limit_key="max_image_pixels",
    )
    checkpoint = load_checkpoint(cfg.ckpt)
    model, weights = model_from_checkpoint(checkpoint, cfg.weights)
    info = ModelInfo.from_checkpoint(checkpoint, weights)
    device = dist.resolve_device(cfg.device)
    model.to(device)
    pixels = build_eval_transform(info.image_size, info.mean, info.std)(image)[None]  # (1, 3, S, S)
    with CrossAttentionMaps(model) as capture, torch.inference_mode():
        scores = torch.sigmoid(model(pixels.to(device)).float())[0].cpu()  # (K,)
    maps = capture.maps[0].cpu()  # (K, H', W')
    top = scores.topk(min(cfg.top_k, len(scores)))
    folder.mkdir(parents=True, exist_ok=True)
    written, cells = [], [captioned(_thumbnail(image), [("input", _INK)], _GRID_FONT)]
    for rank, (label, score) in enumerate(
        zip(top.indices.tolist(), top.values.tolist(), strict=True), 1
    ):
        name, attention = info.class_names[label], maps[label].numpy()
        overlay = heatmap_overlay(image, attention, cfg.alpha)
        # The colours span this map's own range (heatmap_overlay); the bar gives its values.
        low, high = float(attention.min()), float(attention.max())
        caption = f"{name}  (score {score:.3f})"
        path = folder / f"{rank:02d}-{_file_name(name)}.png"
        attention_figure(overlay, low, high, caption, caption_size(image.size)).save(path)
        written.append(path)
        cells.append(attention_figure(_thumbnail(overlay), low, high, caption, _GRID_FONT))
    grid(cells, columns=min(len(cells), 4), gap=8).save(folder / "grid.png")
    log.info(
        "attention of the top %d labels (%s) over a %dx%d grid -> %s",
        len(written),
        ", ".join(
            f"{info.class_names[k]} {s:.3f}"
            for k, s in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ),
        maps.shape[-2],
        maps.shape[-1],
        folder,
    )
    return written


def _new_folder(output: str) -> Path:
    folder = Path(output).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"output={output} exists and is not an empty folder; q2l does not overwrite. Pass a "
            "new folder"
        )
    return folder


def _thumbnail(image):
    scale = _GRID_CELL / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def _file_name(label: str) -> str:
    """A label as a safe file name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "label"

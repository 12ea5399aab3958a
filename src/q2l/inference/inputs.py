"""Which images to predict on, and a dataset that reports an unreadable image instead of failing.

`input=` is a folder (every image file below it, recursively, sorted), a glob pattern, a .txt list
(one path per line, relative to the list's folder; blank lines and `#` comments skipped) or one
image file.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_rgb, upright_rgb
from q2l.utils.errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def resolve_inputs(spec: str) -> list[Path]:
    """The image files `spec` names (see the module docstring), in a reproducible order.

    A listed file that does not exist is kept (it is reported as unreadable when its turn comes);
    a `spec` that names nothing, or no image, raises an error naming it.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        where = f"folder {spec}"
    elif path.is_file() and path.suffix.lower() == ".txt":
        found = _read_list(path)
        where = f"list {spec}"
    elif path.is_file():
        found, where = [path], spec
    elif any(character in spec for character in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        where = f"pattern {spec}"
    else:
        raise FileNotFoundError(f"input={spec}: no such folder, .txt list, image or glob match")
    if not found:
        raise InputError(
            f"input={spec}: the {where} holds no image (extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return found


def _read_list(path: Path) -> list[Path]:
    entries = []
    # A listed name that is not UTF-8 reads as the same bytes Python's own os calls would give it.
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


class ImageFiles(Dataset):
    """Images for prediction: item i -> (image (3, H, W) float32, i, error).

    `paths` are image files or images already in memory (PIL), which go through the same
    conversion (`upright_rgb`) and `transform` as a decoded file.

    `error` is "" for a readable image; for an unreadable one it is the reason (the file named)
    and the image is zeros, so that one bad file never stops a batch or a DataLoader worker. An
    image whose header declares more than `max_pixels` pixels (None: no limit) is unreadable too,
    and never decoded; the reason names the `max_image_pixels` option.
    """

    def __init__(
        self,
        paths: Sequence[Path | Image.Image],
        transform: Callable,
        image_size: int,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        min_size = getattr(self.transform, "min_decode_size", None)
        item = self.paths[index]
        try:
            if isinstance(item, Image.Image):
                image = upright_rgb(item)
            else:
                image = load_rgb(item, min_size, self.max_pixels, "max_image_pixels")
            image = self.transform(image)
        except (BadImageError, OSError) as error:
            blank = torch.zeros(3, self.image_size, self.image_size)
            return blank, index, str(error)
        return image, index, ""


def collate(
    items: list[tuple[torch.Tensor, int, str]],
) -> tuple[torch.Tensor, list[int], list[str]]:
    """(images (B, 3, H, W), indices, errors) from ImageFiles items."""
    images, indices, errors = zip(*items, strict=True)
    return torch.stack(images), list(indices), list(errors)

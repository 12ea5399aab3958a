"""The one dataset class every on-disk format feeds: image paths plus a multi-hot label matrix.

Format readers (COCO, VOC, NUS-WIDE, Open Images, tables) only parse annotations into (paths,
labels, class names); decoding, per-sample seeding, transforms and bad-image handling live here
once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from q2l.data.seeding import SampleKey, seeded_sample
from q2l.utils.errors import InputError, UserError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
# Pillow's own default limit (PIL.Image.MAX_IMAGE_PIXELS): about a 9500 x 9500 image, whose decode
# takes 256 MiB as RGB. Larger files are refused (dataset.max_image_pixels, predict's
# max_image_pixels) before any pixel is decoded: a small PNG can declare billions of pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class BadImageError(UserError, RuntimeError):
    """An image that cannot be read or decoded; the message names the file."""


class MultiLabelImageDataset(Dataset):
    """Images with multi-hot targets.

    __getitem__(key) -> (image, target): image as the transform returns it (a (3, H, W) float
    tensor with the standard transforms), target (K,) float32 with 1 = present, 0 = absent,
    -1 = not annotated. `key` is an index, or a `SampleKey` (index, seed, epoch) from the training
    sampler, in which case the augmentation randomness is seeded from it (see q2l.data.seeding).

    A file that cannot be decoded raises BadImageError naming it (on_bad_image="error"), or is
    logged once, counted in `bad_images` and replaced by the next readable sample
    (on_bad_image="skip"); more than `max_bad_fraction` of the images bad stops the run. The count
    lives in shared memory, so DataLoader workers' finds reach the main process.

    Args:
        image_paths: N image files.
        labels: (N, K) int8 matrix of {1, 0, -1}.
        class_names: K names, in label-column order.
        transform: PIL image -> tensor. If it has a `min_decode_size` attribute (the q2l transforms
            do), large JPEGs are decoded straight at a reduced scale no smaller than that.
        image_ids: N ids as the annotations name the images (for reports); default: the paths.
        on_bad_image: "error" or "skip".
        max_bad_fraction: share of bad images tolerated with "skip", in [0, 1].
        max_image_pixels: an image whose header declares more pixels (width x height) is a bad
            image, refused before it is decoded; None: no limit.
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        labels: np.ndarray,
        class_names: Sequence[str],
        transform: Callable | None = None,
        image_ids: Sequence[str] | None = None,
        on_bad_image: str = "error",
        max_bad_fraction: float = 0.01,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if labels.ndim != 2 or labels.shape != (len(image_paths), len(class_names)):
            raise InputError(
                f"labels must be (num_images={len(image_paths)}, num_classes={len(class_names)}), "
                f"got {labels.shape}"
            )
        if not np.isin(labels, (-1, 0, 1)).all():
            raise InputError(
                "labels must be 1, 0 or -1; got values "
                f"{sorted(set(np.unique(labels)) - {-1, 0, 1})}"
            )
        if image_ids is not None and len(image_ids) != len(image_paths):
            raise InputError(f"{len(image_ids)} image ids for {len(image_paths)} images")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise InputError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be at least 1 or None, got {max_image_pixels}")
        self.image_paths = [Path(p) for p in image_paths]
        self.labels = labels.astype(np.int8, copy=False)
        self.class_names = list(class_names)
        self.transform = transform
        self.image_ids = (
            [str(i) for i in image_ids]
            if image_ids is not None
            else [str(p) for p in self.image_paths]
        )
        self.on_bad_image = on_bad_image
        self.max_bad_fraction = max_bad_fraction
        self.max_image_pixels = max_image_pixels
        # One flag per image in shared memory: allocated before the workers fork or spawn, so every
        # worker's finds are visible to the others and to the main process.
        self._bad_flags = (
            torch.zeros(len(self.image_paths), dtype=torch.uint8).share_memory_()
            if on_bad_image == "skip"
            else None
        )

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            key = SampleKey(*key)
            with seeded_sample(key):
                return self._load(key.index)
        return self._load(int(key))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bad_images(self) -> int:
        """Distinct images found unreadable so far, by this process and its DataLoader workers."""
        return int(self._bad_flags.sum()) if self._bad_flags is not None else 0

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and target of `index`, or with "skip" of the first readable sample after it."""
        min_size = getattr(self.transform, "min_decode_size", None)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self._bad_flags is not None and self._bad_flags[candidate]:
                continue
            try:
                image = load_rgb(
                    self.image_paths[candidate], min_size=min_size, max_pixels=self.max_image_pixels
                )
            except BadImageError as error:
                if self._bad_flags is None:
                    raise
                self._record_bad(candidate, error)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, torch.from_numpy(self.labels[candidate].astype(np.float32))
        raise BadImageError(f"no readable image left in this data set of {len(self)} images")

    def _record_bad(self, index: int, error: BadImageError) -> None:
        """Flag, log once, and stop the run when the share of bad images passes the limit."""
        self._bad_flags[index] = 1
        log.warning("skipping unreadable image (on_bad_image=skip): %s", error)
        bad = self.bad_images
        if bad > self.max_bad_fraction * len(self):
            raise BadImageError(
                f"{bad} of {len(self)} images are unreadable ({bad / len(self):.2%}), more than "
                f"dataset.max_bad_fraction={self.max_bad_fraction}; latest: {error}. "
                "List them all with q2l-validate-data dataset=... dataset.validate=full"
            )


def load_rgb(
    path: Path,
    min_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    limit_key: str = "dataset.max_image_pixels",
) -> Image.Image:
    """Decode an image fully into RGB, upright according to its EXIF orientation.

    With `min_size`, a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, PIL's draft mode), never below `min_size` on either side: a
    4000 px photo for a 448 px model decodes several times faster.

    The decode is forced here (not left to the first transform) so a truncated file fails inside
    this function, with the file named. An image over `max_pixels` (see `open_image`) fails before
    its decode, naming `limit_key`, the config key that sets the limit.
    """
    try:
        with open_image(path, max_pixels, limit_key) as image:
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            return upright_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImageError(f"cannot read image {path}: {error}") from error


def upright_rgb(image: Image.Image) -> Image.Image:
    """`image` (opened or in memory) as RGB, upright according to its EXIF orientation; 16- and
    32-bit greyscale scaled to 8 bits. What `load_rgb` does after opening a file."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


@contextlib.contextmanager
def open_image(
    path: Path, max_pixels: int | None, limit_key: str = "dataset.max_image_pixels"
) -> Iterator[Image.Image]:
    """`PIL.Image.open(path)` (the header only; nothing decoded yet), refused with BadImageError
    naming the file, its size and `limit_key` when width x height exceeds `max_pixels` (None: no
    limit).

    q2l applies its own configured limit in place of Pillow's process-wide one
    (`PIL.Image.MAX_IMAGE_PIXELS`), which is turned off here: Pillow's would only warn between its
    limit and twice that, and refuse above whatever the config says.
    """
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                f"image {path} is {width} x {height} = {width * height:,} pixels, more than "
                f"{limit_key}={max_pixels}; a file you trust can be allowed by raising "
                f"{limit_key} (null: no limit)"
            )
        yield image

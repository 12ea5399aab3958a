"""Decoding and augmenting training images on the training device: nvJPEG on a GPU.

With `dataset.decode=device` the DataLoader workers only read each training image's file
(`EncodedImages`); the training step decodes the whole batch on the device with torchvision's
`decode_jpeg` (nvJPEG on CUDA, one call per batch) and augments it there (`DeviceAugment`): the
CPU recipe's square resize or random resized crop, flip, Cutout and RandAugment
(q2l.data.transforms), then normalisation. A GPU then needs CPU cores only to read files, not to
decode and augment (docs/performance.md measures both per core). Validation keeps the CPU
pipeline: it has no augmentation. On a CPU device the same code decodes with libjpeg-turbo;
that is how it is tested.

The augmentation draws from the main process's torch generator, which checkpoints save, so runs
resume exactly and do not depend on num_workers. Its images are close to the CPU recipe's, not
equal: another decoder's rounding, tensor resampling, and bilinear instead of bicubic shears.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, v2

from q2l.data.dataset import BadImageError, MultiLabelImageDataset, open_image
from q2l.data.randaugment import (
    CUTOUT_COLOUR,
    CUTOUT_SIZES,
    GREY,
    OPERATIONS,
    POSTERIZE_BITS,
)
from q2l.utils.errors import ConfigError

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


class DeviceAugment:
    """Encoded training images -> (B, 3, S, S) normalised float images on `device`, augmented.

    Takes the training recipe's options (`build_train_transform`'s names), in its order: square
    resize to `image_size` (or a random resized crop with `scale`), horizontal flip, Cutout,
    RandAugment ("official": the Query2Label policy, q2l.data.randaugment; "torchvision":
    T.RandAugment), then normalisation with `mean`/`std`. timm's policies (`auto_augment`) and
    RandomErasing are not offered here and raise ConfigError.

    __call__(batch, targets) -> (images, targets): `batch` an EncodedBatch of B files, targets
    (B, K); images (B, 3, S, S) float32 on `device` (channels_last with `channels_last`).
    """

    def __init__(
        self,
        device: torch.device,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
        hflip: float = 0.0,
        scale: Sequence[float] | None = None,
        randaugment: bool = False,
        randaugment_policy: str = "torchvision",
        randaugment_num_ops: int = 2,
        randaugment_magnitude: int = 9,
        cutout_factor: float = 0.0,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        # Accepted so that the augment config passes unchanged; they only shape RandomErasing.
        random_erasing_mode: str = "pixel",
        random_erasing_count: int = 1,
    ) -> None:
        if auto_augment or random_erasing > 0:
            raise ConfigError(
                "dataset.decode=device offers resize/crop, hflip, cutout and randaugment; "
                "augment.auto_augment and augment.random_erasing need dataset.decode=workers"
            )
        policy = str(getattr(randaugment_policy, "value", randaugment_policy))
        if randaugment and policy not in ("official", "torchvision"):
            raise ConfigError(f"augment.randaugment_policy={policy!r}: official or torchvision")
        self.device = device
        self.image_size = image_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.hflip = hflip
        self.scale = tuple(scale) if scale is not None else None
        self.cutout_factor = cutout_factor
        self.randaugment = policy if randaugment else None
        self.torchvision_randaugment = v2.RandAugment(
            num_ops=randaugment_num_ops, magnitude=randaugment_magnitude
        )
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(
        self, batch: EncodedBatch, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = decode_batch(batch, self.device)  # B × (3, H_i, W_i) uint8
        images = torch.stack([self._augment(image) for image in decoded])  # (B, 3, S, S) uint8
        images = (images.float() - self.mean) / self.std
        return images.contiguous(memory_format=self.memory_format), targets.to(self.device)

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) uint8, one image's draws from torch's CPU generator."""
        size = [self.image_size, self.image_size]
        if self.scale is None:
            image = F.resize(image, size, antialias=True)
        else:
            top, left, height, width = _random_crop_box(image.shape[-2:], self.scale)
            image = F.resized_crop(image, top, left, height, width, size, antialias=True)
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image = F.horizontal_flip(image)
        if self.cutout_factor > 0:
            image = _cutout(image, self.cutout_factor)
        if self.randaugment == "official":
            image = official_randaugment(image)
        elif self.randaugment == "torchvision":
            image = self.torchvision_randaugment(image)
        return image


@dataclass
class EncodedBatch:
    """B encoded image files as the DataLoader hands them over: bytes (uint8, 1-D) and names."""

    data: list[torch.Tensor]
    names: list[str]

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self) -> EncodedBatch:
        """DataLoader(pin_memory=True) calls this: page-locked bytes copy to the GPU faster."""
        return EncodedBatch([data.pin_memory() for data in self.data], self.names)


class EncodedImages(Dataset):
    """A MultiLabelImageDataset whose items are files, not decoded images (their headers are
    read: an image over the data set's max_image_pixels raises BadImageError).

    __getitem__(index) -> (bytes (uint8, 1-D), target (K,) float32, file name). The labels,
    class names and length are the wrapped data set's.
    """

    def __init__(self, dataset: MultiLabelImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        path = self.dataset.image_paths[int(index)]
        try:
            # The header first: a file declaring more than dataset.max_image_pixels is refused
            # before anything decodes it, as the workers' pipeline refuses it (load_rgb).
            with open_image(path, self.dataset.max_image_pixels):
                pass
            data = read_file(str(path))
        except BadImageError:
            raise
        except (OSError, RuntimeError, ValueError, SyntaxError) as error:
            raise BadImageError(f"cannot read image {path}: {error}") from error
        target = torch.from_numpy(self.dataset.labels[int(index)].astype("float32"))
        return data, target, str(path)

    @property
    def labels(self):
        return self.dataset.labels

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def collate_encoded(
    samples: list[tuple[torch.Tensor, torch.Tensor, str]],
) -> tuple[EncodedBatch, torch.Tensor]:
    """DataLoader collate_fn for EncodedImages: (EncodedBatch of B files, targets (B, K))."""
    data, targets, names = zip(*samples, strict=True)
    return EncodedBatch(list(data), list(names)), torch.stack(targets)


def decode_batch(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """Each file as a (3, H, W) uint8 RGB tensor on `device`, upright per its EXIF orientation.

    JPEGs are decoded together on `device` (nvJPEG on CUDA); other formats (PNG, ...) on the CPU
    and copied. A file that does not decode raises BadImageError naming it.
    """
    jpegs = [i for i, data in enumerate(batch.data) if bytes(data[:3].tolist()) == _JPEG_MAGIC]
    images: list[torch.Tensor | None] = [None] * len(batch)
    try:
        # nvJPEG ignores EXIF orientation: it is read and applied below, for every device alike.
        decoded = decode_jpeg([batch.data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(batch, i, device) for i in jpegs]  # find the file that failed
    for index, image in zip(jpegs, decoded, strict=True):
        images[index] = _orient(image, _exif_orientation(batch.data[index]))
    for index, image in enumerate(images):
        if image is None:
            images[index] = _decode_one(batch, index, device)
    return images


def _decode_one(batch: EncodedBatch, index: int, device: torch.device) -> torch.Tensor:
    try:
        image = decode_image(
            batch.data[index].cpu(), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    except RuntimeError as error:
        raise BadImageError(f"cannot read image {batch.names[index]}: {error}") from error
    return image.to(device, non_blocking=True)


def _exif_orientation(data: torch.Tensor) -> int:
    """The EXIF orientation tag (1-8) of an encoded image; 1 (upright) when it has none."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:  # reads the headers only
            return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):
        return 1


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) turned upright from EXIF `orientation`, as PIL's ImageOps.exif_transpose does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)  # the orientations that swap width and height
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def official_randaugment(
    image: torch.Tensor, num_ops: int = 2, probability: float = 0.5
) -> torch.Tensor:
    """q2l.data.randaugment.OfficialRandAugment on a (3, H, W) uint8 tensor: the same draws from
    torch's generator (operation, level, application, sign), the operations on tensors."""
    for _ in range(num_ops):
        name = OPERATIONS[int(torch.randint(len(OPERATIONS), ()))]
        level = int(torch.randint(1, 10, ()))
        if float(torch.rand(())) < probability:
            sign = 1 if int(torch.randint(2, ())) else -1
            image = _apply_operation(image, name, level, sign)
    return image


def _apply_operation(image: torch.Tensor, name: str, level: int, sign: int) -> torch.Tensor:
    """q2l.data.randaugment.apply_operation's operation `name` at `level` on a uint8 tensor."""
    height, width = image.shape[-2:]
    if name in ("shear_x", "shear_y"):
        # PIL maps output to input, x_in = x + s·y: torchvision's shear of atan(s) about the corner.
        angle = math.degrees(math.atan(sign * _level_value(0.0, 0.3, level)))
        shear = [angle, 0.0] if name == "shear_x" else [0.0, angle]
        return _affine(image, shear=shear, interpolation=InterpolationMode.BILINEAR)
    if name in ("translate_x", "translate_y"):
        shift = sign * _level_value(0.0, 150 / 331, level)
        translate = [-shift * width, 0.0] if name == "translate_x" else [0.0, -shift * height]
        return _affine(image, translate=translate)
    if name == "rotate":
        return F.rotate(image, _level_value(0.0, 30.0, level), fill=list(GREY))
    factor = 1 + sign * _level_value(0.0, 0.9, level)
    if name == "color":
        return F.adjust_saturation(image, factor)
    if name == "contrast":
        return F.adjust_contrast(image, factor)
    if name == "sharpness":
        return F.adjust_sharpness(image, factor)
    if name == "brightness":
        return F.adjust_brightness(image, factor)
    if name == "posterize":
        return F.posterize(image, POSTERIZE_BITS[level])
    if name == "solarize":
        return F.solarize(image, min(_level_value(256.0, 0.0, level), 255.0))
    if name == "cutout":
        half = CUTOUT_SIZES[level] // 2
        return _fill_square(image, half, half, CUTOUT_COLOUR)
    if name == "autocontrast":
        return F.autocontrast(image)
    if name == "equalize":
        return F.equalize(image)
    if name == "invert":
        return F.invert(image)
    raise ConfigError(f"unknown operation {name!r}; choose one of {OPERATIONS}")


def _affine(
    image: torch.Tensor,
    shear: list[float] | None = None,
    translate: list[float] | None = None,
    interpolation: InterpolationMode = InterpolationMode.NEAREST,
) -> torch.Tensor:
    return F.affine(
        image,
        angle=0.0,
        translate=translate or [0.0, 0.0],
        scale=1.0,
        shear=shear or [0.0, 0.0],
        interpolation=interpolation,
        fill=list(GREY),
        center=[0.0, 0.0],
    )


def _level_value(start: float, stop: float, level: int) -> float:
    """numpy.linspace(start, stop, 10)[level], as q2l.data.randaugment's tables are built."""
    return stop if level == 9 else start + level * ((stop - start) / 9)


def _cutout(image: torch.Tensor, factor: float) -> torch.Tensor:
    """q2l.data.transforms.Cutout on a tensor: a hole of factor·size sides in a random colour."""
    height, width = image.shape[-2:]
    half_w, half_h = int(factor * width) // 2, int(factor * height) // 2
    return _fill_square(image, half_w, half_h, None)


def _fill_square(
    image: torch.Tensor, half_w: int, half_h: int, colour: Sequence[int] | None
) -> torch.Tensor:
    """A box of half-sides (half_w, half_h) around a random centre, clipped at the border,
    filled with `colour` (None: a random one)."""
    height, width = image.shape[-2:]
    center_x, center_y = int(torch.randint(width, ())), int(torch.randint(height, ()))
    if colour is None:
        colour = [int(c) for c in torch.randint(256, (3,))]
    left, top = max(center_x - half_w, 0), max(center_y - half_h, 0)
    right, bottom = min(center_x + half_w, width), min(center_y + half_h, height)
    image = image.clone()
    if right > left and bottom > top:
        fill = torch.tensor(colour, dtype=image.dtype, device=image.device).view(3, 1, 1)
        image[:, top:bottom, left:right] = fill
    return image


def _random_crop_box(
    size: torch.Size, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params for an image of `size` (H, W): top, left, h, w."""
    height, width = int(size[0]), int(size[1])
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w
    side = min(height, width)  # fall back to the central square, as torchvision does for ratio 1
    return (height - side) // 2, (width - side) // 2, side, side

"""Data pipeline: images per second through q2l's dataset and transforms against plain PIL.

The q2l side is `MultiLabelImageDataset.__getitem__` with q2l's transform builders, exactly what a
training DataLoader worker runs (decode via `q2l.data.dataset.load_rgb`, then the transform), so
any change there (such as decoding JPEGs at reduced scale) is measured as it is. The plain side is
`PIL.Image.open(path).convert("RGB")` followed by the same torchvision operations. One process on
one intra-op thread, as PyTorch runs each DataLoader worker: the throughput of one worker.
DataLoader worker counts are measured separately.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from benchmarks.timing import Row, Workload, compare, interleaved
from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.metrics import single_threaded
from q2l.models.backbone import normalization

SOURCE_SIZE = (640, 480)  # COCO's most common image size
LIGHT_AUGMENT = {"hflip": 0.5, "scale": [0.7, 1.0]}  # conf/augment/light.yaml


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 640×480 JPEGs (quality 90) with smooth structure and sensor-like noise."""
    generator = np.random.default_rng(seed)
    width, height = SOURCE_SIZE
    paths = []
    for index in range(count):
        coarse = generator.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = np.asarray(
            Image.fromarray(coarse).resize(SOURCE_SIZE, Image.BICUBIC), dtype=np.float32
        )
        image += generator.normal(0.0, 8.0, image.shape)
        path = folder / f"image_{index:04d}.jpg"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _plain_sample(path: Path, transform: T.Compose) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def measure_pipeline(num_images: int, rounds: int, backbone: str = "resnet50") -> list[Row]:
    """Section c (one worker) and the DataLoader worker lever."""
    mean, std = normalization(backbone)
    rows = []
    with tempfile.TemporaryDirectory(prefix="q2l-bench-jpeg-") as folder:
        paths = write_jpegs(Path(folder), num_images)
        labels = np.zeros((len(paths), 1), dtype=np.int8)

        def dataset(transform) -> MultiLabelImageDataset:
            return MultiLabelImageDataset(paths, labels, ["object"], transform=transform)

        def q2l_workload(data: MultiLabelImageDataset) -> Workload:
            return Workload(lambda: sum(1 for index in range(len(data)) if data[index] is not None))

        def plain_workload(transform: T.Compose) -> Workload:
            return Workload(
                lambda: sum(1 for path in paths if _plain_sample(path, transform) is not None)
            )

        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        cases = []
        for size in (448, 224):
            plain = T.Compose([T.Resize((size, size), antialias=True), *normalize])
            cases.append(
                (
                    f"eval transform {size} px",
                    dataset(build_eval_transform(size, mean, std)),
                    plain,
                    1.5 if size == 224 else None,
                )
            )
        plain_light = T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.7, 1.0), antialias=True),
                T.RandomHorizontalFlip(0.5),
                *normalize,
            ]
        )
        cases.append(
            (
                "train transform 224 px, augment=light",
                dataset(build_train_transform(224, mean, std, **LIGHT_AUGMENT)),
                plain_light,
                None,
            )
        )
        for name, data, plain, target in cases:
            with single_threaded():
                rates = interleaved(
                    {"q2l": q2l_workload(data), "plain": plain_workload(plain)}, rounds
                )
            rows.append(
                compare(
                    "c. data",
                    f"{name}, 640×480 JPEG",
                    rates["q2l"],
                    rates["plain"],
                    "img/s",
                    "PIL open+convert, torchvision",
                    target=target,
                )
            )
        rows += _measure_workers(dataset(build_eval_transform(224, mean, std)), rounds)
    return rows


def _measure_workers(data: MultiLabelImageDataset, rounds: int) -> list[Row]:
    """DataLoader images/s with 1 and 2 worker processes against loading in the main process."""
    loaders = {
        workers: DataLoader(
            data,
            batch_size=16,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers else None,
        )
        for workers in (0, 1, 2)
    }

    def epoch(loader: DataLoader) -> Workload:
        return Workload(lambda: sum(images.shape[0] for images, _ in loader))

    rates = interleaved({workers: epoch(loader) for workers, loader in loaders.items()}, rounds)
    del loaders
    return [
        compare(
            "levers",
            f"data 224 px: DataLoader num_workers={workers}",
            rates[workers],
            rates[0],
            "img/s",
            "num_workers=0",
        )
        for workers in (1, 2)
    ]

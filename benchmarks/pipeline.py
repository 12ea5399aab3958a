"""Data pipeline: images per second of one DataLoader worker core, q2l against the official code
and plain PIL, and the CPU cores a GPU would need.

The q2l side is `MultiLabelImageDataset.__getitem__` with q2l's transform builders, exactly what a
training DataLoader worker runs (decode via `q2l.data.dataset.load_rgb`, then the transform;
training samples keyed and seeded per sample), so any change there is measured as it is. The
official side is the official code's training pipeline at the paper's 448 px (see the note below);
the plain side `PIL.Image.open(path).convert("RGB")` followed by the same torchvision operations.
Everything runs in one process on one intra-op thread, as PyTorch runs each DataLoader worker: the
throughput of one worker core. With dataset.decode=device a worker only reads files; its rate is
measured too, and both rates are turned into cores per GPU at GPU_TRAINING_RATES.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from benchmarks.flops import count_flops
from benchmarks.throughput import CASES, build_case_model, compose_config
from benchmarks.timing import Rates, Row, Workload, compare, interleaved
from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.device_decode import EncodedImages
from q2l.data.randaugment import OfficialRandAugment
from q2l.data.seeding import SampleKey
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.metrics import single_threaded
from q2l.models.backbone import normalization

SOURCE_SIZE = (640, 480)  # COCO's most common image size
PAPER_SIZE = 448
# conf/augment/q2l.yaml: square resize, Cutout of half the side, the official RandAugment policy.
PAPER_AUGMENT = {"cutout_factor": 0.5, "randaugment": True, "randaugment_policy": "official"}
OFFICIAL_PIPELINE_NOTE = (
    "official: PIL open+convert, Resize((448, 448)), the checkout's CutoutPIL(0.5), RandAugment "
    "(its PyPI randaugment 1.0.2 no longer runs on NumPy >= 1.24: q2l's port of the same policy), "
    "ToTensor, Normalize; one process on one thread, as a DataLoader worker runs"
)
# What a GPU trains the paper model (R50, paper head) at, 448 px, bf16: its dense bf16 peak at
# GPU_UTILISATION over the FLOPs of one training image (counted here, as section e counts them).
# An estimate until scripts/gpu_check.py measures a card (docs/performance.md).
GPU_BF16_PEAK_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}
GPU_UTILISATION = 0.4


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


def measure_pipeline(
    num_images: int, rounds: int, official_root: Path | None = None, backbone: str = "resnet50"
) -> list[Row]:
    """Section c: one worker core's images/s (the paper's 448 px training pipeline against the
    official code's, evaluation transforms against plain PIL, the device path's CPU share), the
    cores a GPU would need, and the DataLoader worker lever."""
    mean, std = normalization(backbone)
    rows = []
    with tempfile.TemporaryDirectory(prefix="q2l-bench-jpeg-") as folder:
        paths = write_jpegs(Path(folder), num_images)
        labels = np.zeros((len(paths), 1), dtype=np.int8)

        def dataset(transform) -> MultiLabelImageDataset:
            return MultiLabelImageDataset(paths, labels, ["object"], transform=transform)

        def q2l_workload(data: MultiLabelImageDataset, train: bool = False) -> Workload:
            # Training samples come keyed (index, seed, epoch), and are seeded per sample.
            keys = [SampleKey(i, 0, 0) if train else i for i in range(len(data))]
            return Workload(lambda: sum(1 for key in keys if data[key] is not None))

        def plain_workload(transform: T.Compose) -> Workload:
            return Workload(
                lambda: sum(1 for path in paths if _plain_sample(path, transform) is not None)
            )

        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        paper = dataset(build_train_transform(PAPER_SIZE, mean, std, **PAPER_AUGMENT))
        train_rates = {"q2l": q2l_workload(paper, train=True)}
        if official_root is not None:
            cutout = official_cutout(official_root)
            official = T.Compose(
                [T.Resize((PAPER_SIZE, PAPER_SIZE)), cutout, OfficialRandAugment(), *normalize]
            )
            train_rates["official"] = plain_workload(official)
        files = EncodedImages(dataset(None))
        train_rates["device path: read"] = Workload(
            lambda: sum(1 for index in range(len(files)) if files[index] is not None)
        )
        with single_threaded():
            rates = interleaved(train_rates, rounds)
        if "official" in rates:
            rows.append(
                compare(
                    "c. data",
                    f"train {PAPER_SIZE} px, paper augmentation, 640×480 JPEG, one worker core",
                    rates["q2l"],
                    rates["official"],
                    "img/s",
                    "official Q2L pipeline",
                    note=OFFICIAL_PIPELINE_NOTE,
                )
            )
        rows += cores_rows(rates)
        for size in (448, 224):
            plain = T.Compose([T.Resize((size, size), antialias=True), *normalize])
            with single_threaded():
                measured = interleaved(
                    {
                        "q2l": q2l_workload(dataset(build_eval_transform(size, mean, std))),
                        "plain": plain_workload(plain),
                    },
                    rounds,
                )
            rows.append(
                compare(
                    "c. data",
                    f"eval transform {size} px, 640×480 JPEG",
                    measured["q2l"],
                    measured["plain"],
                    "img/s",
                    "PIL open+convert, torchvision",
                    target=1.5 if size == 224 else None,
                )
            )
        rows += _measure_workers(dataset(build_eval_transform(224, mean, std)), rounds)
    return rows


def cores_rows(rates: dict[str, Rates]) -> list[Row]:
    """Worker cores a GPU would keep busy at its estimated 448 px training rate: with q2l's CPU
    pipeline (decode + augment per core) and with dataset.decode=device (reading files)."""
    flops = paper_train_flops(PAPER_SIZE)
    rows = [
        Row(
            "c. data",
            f"paper model: train GFLOP per {PAPER_SIZE} px image",
            flops / 1e9,
            None,
            "GFLOP",
        )
    ]
    for gpu, peak in GPU_BF16_PEAK_TFLOPS.items():
        rate = GPU_UTILISATION * peak * 1e12 / flops
        for side, name in (("q2l", "CPU pipeline"), ("device path: read", "decode=device")):
            per_core = rates[side].median
            rows.append(
                Row(
                    "c. data",
                    f"cores to feed an {gpu} at {rate:.0f} img/s, {name}",
                    rate / per_core,
                    None,
                    "cores",
                    note=(
                        f"{per_core:.0f} img/s per worker core; the GPU's rate estimated at "
                        f"{GPU_UTILISATION:.0%} of its {peak:.0f} TFLOP/s dense bf16 peak"
                    ),
                )
            )
    return rows


def paper_train_flops(image_size: int) -> float:
    """FLOPs of one training image (forward + backward) of the paper case at `image_size`."""
    case = CASES["paper"]
    cfg = compose_config([*case.overrides, f"dataset.image_size={image_size}"])
    model = build_case_model(case, cfg)
    return count_flops(model, torch.randn(1, 3, image_size, image_size), train=True)


def official_cutout(root: Path):
    """The official code's CutoutPIL(cutout_factor=0.5), from its checkout's lib/utils/cutout.py."""
    spec = importlib.util.spec_from_file_location(
        "q2l_bench_official_cutout", root / "lib" / "utils" / "cutout.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CutoutPIL(cutout_factor=0.5)


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

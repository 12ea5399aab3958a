"""Process-level runtime: device choice, rank and world size, seeding. Nothing else reads ranks.

A single process is rank 0 of a world of 1; under torchrun the environment says otherwise.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Only rank 0 writes files, logs to TensorBoard and shows progress bars."""
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> this rank's CUDA device when CUDA is present, else CPU; other names as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.device={name!r} but CUDA is not available; use device=cpu or auto"
        )
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch with seed + rank; optionally force deterministic kernels."""
    seed = seed + rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = (
            True  # fixed input sizes: let cuDNN pick the fastest kernels
        )

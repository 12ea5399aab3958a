"""Processes: device choice, rank and world size, the process group, collectives, seeding.

A single process is rank 0 of a world of 1, and every helper here is then a no-op. Several
processes come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) or from SLURM
tasks (srun, hydra-submitit-launcher: SLURM_PROCID/SLURM_NTASKS, exported to the torchrun names
through submitit). Nothing outside this module reads ranks or calls torch.distributed.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from q2l.utils.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


class PeerError(RuntimeError):
    """Another rank failed; this one stops with its message instead of hanging in a collective."""


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Only rank 0 writes files, logs to TensorBoard and shows progress bars."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def launched_by_torchrun() -> bool:
    """True in one of several processes started by torchrun (or any launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def launched_as_tasks() -> bool:
    """True in one of several tasks of a SLURM step (srun, hydra-submitit-launcher) or of a
    submitit local job, when torchrun did not start the process (no RANK)."""
    if "RANK" in os.environ:
        return False
    tasks = os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1
    return int(tasks) > 1


def init() -> None:
    """Join the process group when this process is one of several; a no-op otherwise.

    The backend follows the hardware: NCCL with CUDA, gloo on CPU. Every collective is bounded by
    Q2L_DIST_TIMEOUT_MIN minutes (default 30), so a rank that died takes the job down instead of
    leaving the others hanging (torchrun and srun also stop the other ranks when one exits).
    """
    if torch_dist.is_initialized():
        return
    if launched_as_tasks():
        from submitit.helpers import TorchDistributedEnvironment

        # Each task keeps every GPU visible and picks cuda:LOCAL_RANK (resolve_device).
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if not launched_by_torchrun():  # submitit tasks were exported as torchrun's variables above
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(
        backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes())
    )


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only: one rank tells the story."""
    if rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)


def timeout_minutes() -> float:
    return float(os.environ.get("Q2L_DIST_TIMEOUT_MIN", 30))


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """'auto' -> this rank's CUDA device when CUDA is present, else CPU; other names as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
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


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def on_main(function: Callable[..., T], *args: Any) -> T:
    """Run `function` on rank 0 only and hand its result to every rank.

    If it raises, rank 0 re-raises the error and the other ranks raise PeerError with its message,
    all at once: a refused start (busy run directory, changed config) never leaves ranks waiting.
    A BaseException that is not an error (a stop request, KeyboardInterrupt) is raised as the
    same class on every rank, so that all of them stop the same way.
    """
    result, failure = None, None
    if is_main_process():
        try:
            result = function(*args)
        except BaseException as error:
            failure = error
    if not is_distributed():
        if failure is not None:
            raise failure
        return result
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    control = None if failure is None or isinstance(failure, Exception) else type(failure)
    outcome = broadcast((result, message, control))
    if failure is not None:
        raise failure
    if outcome[2] is not None:
        raise outcome[2](f"rank 0: {outcome[1]}")
    if outcome[1] is not None:
        raise PeerError(f"rank 0 failed: {outcome[1]}")
    return outcome[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a collective decision (one all-reduce)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor(float(flag), device=_object_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return bool(tensor.item())


def sum_over_ranks(value: float) -> float:
    """The sum of `value` over all ranks, on every rank."""
    if not is_distributed():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_object_device())
    torch_dist.all_reduce(tensor)
    return float(tensor.item())


def gather_rows(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's (n_r, ...) rows on rank 0 in rank order; None on the other ranks.

    Ranks may hold different row counts (exact evaluation shards are not padded), so rows are
    padded to the largest count for the all-gather and trimmed again.
    """
    if not is_distributed():
        return tensor
    device = _object_device()
    local = tensor.to(device)
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world_size())]
    torch_dist.all_gather(counts, torch.tensor(len(local), device=device))
    longest = int(max(counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    torch_dist.all_gather(parts, padded)
    if not is_main_process():
        return None
    return torch.cat([part[: int(count)] for part, count in zip(parts, counts, strict=True)]).cpu()


def gather_objects(value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0, in rank order (None elsewhere)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(values, value)
    return values if is_main_process() else None


def broadcast_module_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all replicas are the model
    rank 0 saves (each rank's last training forward updated its own statistics)."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer.data, src=0)


def _object_device() -> torch.device:
    """Where collectives stage their tensors: the rank's GPU under NCCL, the CPU under gloo."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

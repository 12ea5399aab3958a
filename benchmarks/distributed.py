"""DDP on CPU: training throughput of 2 processes (gloo, one thread each) next to 1 process with
two threads, at the same global batch, on the same cores.

Both sides run q2l's own step (`q2l.training.engine.train_one_epoch`) on the demo-sized model with
synthetic batches; the 2-process side wraps the model in DistributedDataParallel exactly as
`train.py` does under torchrun. Each round starts both configurations fresh and times them after
warm-up steps, inside the workers, so process start-up is not counted.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from benchmarks.throughput import CASES, build_case_model, compose_config, q2l_state
from benchmarks.timing import Row
from q2l.training.build import construct
from q2l.training.engine import train_one_epoch

WARMUP_STEPS = 3


def measure_ddp_scaling(rounds: int, steps: int = 12, case: str = "demo") -> list[Row]:
    """Rows: 2-process images/s against 1-process images/s, per-round ratios and their spread."""
    one, two, ratios = [], [], []
    for _ in range(max(rounds, 1)):
        single = _run(world_size=1, threads=2, steps=steps, case=case)
        double = _run(world_size=2, threads=1, steps=steps, case=case)
        one.append(single)
        two.append(double)
        ratios.append(double / single)
    cfg = compose_config(CASES[case].overrides)
    batch = cfg.dataset.batch_size
    return [
        Row(
            "g. distributed",
            f"{case}: train, 2 processes x 1 thread (gloo, DDP) vs 1 process x 2 threads",
            sorted(two)[len(two) // 2],
            sorted(one)[len(one) // 2],
            "img/s",
            "1 process",
            round_ratios=ratios,
            note=f"global batch {batch} (2 x {batch // 2} vs 1 x {batch}), {steps} timed steps",
        )
    ]


def _run(world_size: int, threads: int, steps: int, case: str) -> float:
    """Global images per second of `steps` training steps in `world_size` fresh processes."""
    with tempfile.TemporaryDirectory(prefix="q2l-bench-ddp-") as folder:
        result = Path(folder) / "result.json"
        mp.spawn(
            _worker,
            args=(world_size, threads, steps, case, folder),
            nprocs=world_size,
            join=True,
        )
        return json.loads(result.read_text())["images_per_sec"]


def _worker(rank: int, world_size: int, threads: int, steps: int, case: str, folder: str) -> None:
    torch.set_num_threads(threads)
    if world_size > 1:
        torch_dist.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size
        )
    cfg = compose_config(CASES[case].overrides)
    per_process = cfg.dataset.batch_size // world_size
    model = build_case_model(CASES[case], cfg)
    state, options = q2l_state(cfg, model, construct(cfg.loss))
    if world_size > 1:
        state.forward = torch.nn.parallel.DistributedDataParallel(state.model)
    generator = torch.Generator().manual_seed(rank)
    size, classes = cfg.dataset.image_size, CASES[case].num_classes
    batches = [
        (
            torch.randn(per_process, 3, size, size, generator=generator),
            (torch.rand(per_process, classes, generator=generator) < 0.3).float(),
        )
        for _ in range(WARMUP_STEPS + steps)
    ]
    train_one_epoch(state, batches[:WARMUP_STEPS], options)
    if world_size > 1:
        torch_dist.barrier()
    start = time.perf_counter()
    train_one_epoch(state, batches[WARMUP_STEPS:], options)
    if world_size > 1:
        torch_dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        images = steps * per_process * world_size
        (Path(folder) / "result.json").write_text(json.dumps({"images_per_sec": images / seconds}))
    if world_size > 1:
        torch_dist.destroy_process_group()

"""Where a training step's time goes: torch.profiler over q2l's own step, grouped by kind of work.

    python -m benchmarks.profile_step                        # the paper case, 2 threads
    python -m benchmarks.profile_step --case demo --threads 1 --steps 20
    python -m benchmarks.profile_step --precision fp32       # the same step without autocast

The step is `q2l.training.engine.train_one_epoch` at the config's defaults (precision=auto,
channels_last, fused AdamW, weight EMA, malloc keeping freed memory), on the synthetic batches
section a times. Each operator's self CPU time is put into one bucket (convolution
forward/backward, matmul, BatchNorm, casts and copies, optimizer, EMA, ...); the table gives each
bucket's share of the profiled steps, the heaviest operators beside it. Shares, not absolute
times, are what carries between machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict

import torch
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile

from benchmarks.throughput import (
    CASES,
    build_case_model,
    compose_config,
    q2l_state,
    q2l_train,
    synthetic_batches,
)
from q2l.utils.allocator import configure_malloc

# First match wins: (bucket, substrings of the operator's name).
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward")),
    ("convolution forward", ("convolution", "conv2d")),
    ("matmul (linear, attention)", ("mm", "matmul", "linear", "baddbmm", "bmm", "addmm")),
    ("BatchNorm", ("batch_norm",)),
    ("casts and copies", ("to_copy", "aten::to", "copy_", "contiguous", "clone")),
    ("optimizer (fused AdamW)", ("adam", "optimizer")),
    ("EMA (lerp)", ("lerp", "_foreach_mul", "_foreach_add")),
    ("activations, pooling", ("relu", "threshold", "max_pool", "gelu", "softmax", "pool")),
    ("LayerNorm", ("layer_norm",)),
    ("loss", ("sigmoid", "log", "pow", "binary_cross")),
    ("elementwise", ("add", "mul", "div", "sub", "fill_", "zero_", "where")),
    ("reductions", ("sum", "mean", "norm", "isfinite", "all", "amax")),
)


def bucket_of(name: str) -> str:
    lowered = name.lower()
    for bucket, keys in BUCKETS:
        if any(key in lowered for key in keys):
            return bucket
    return "other"


def profile_steps(case_key: str, steps: int, warmup: int, precision: str | None) -> dict:
    """Profile `steps` training steps of `case_key` after `warmup` untimed ones."""
    case = CASES[case_key]
    if precision:
        case = dataclasses.replace(
            case, overrides=(*case.overrides, f"trainer.precision={precision}")
        )
    # Only q2l's side: build_sides would also build the plain fp32 model and its optimizer.
    cfg = compose_config(case.overrides)
    state, options = q2l_state(cfg, build_case_model(case, cfg), instantiate(cfg.loss))
    batches = synthetic_batches(cfg, case.num_classes, steps)
    workload = q2l_train(state, options, batches[:1])
    workload.prepare()
    # malloc as `python train.py` sets it (no page faults for what a step allocates again).
    configure_malloc(keep_freed=workload.keep_freed_memory)
    try:
        for _ in range(warmup):
            workload.run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            q2l_train(state, options, batches).run()
    finally:
        configure_malloc(keep_freed=False)  # and the kept heap back, for the caller
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    buckets: dict[str, float] = defaultdict(float)
    for event in events:
        buckets[bucket_of(event.key)] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "case": case.title,
        "precision": options.precision,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "ms_per_step": total / 1000 / steps,
        "buckets": {k: v / total for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
        "top": [(e.key, e.self_cpu_time_total / total, e.count // steps) for e in top],
    }


def render(result: dict) -> str:
    lines = [
        f"{result['case']}",
        f"precision {result['precision']}, {result['threads']} intra-op thread(s), "
        f"{result['steps']} profiled steps, {result['ms_per_step']:.0f} ms of operator time "
        "per step",
        "",
        "| where the time goes | share |",
        "|---|---|",
    ]
    lines += [f"| {name} | {share:.1%} |" for name, share in result["buckets"].items()]
    lines += ["", "| heaviest operators (self time) | share | calls per step |", "|---|---|---|"]
    lines += [f"| `{name}` | {share:.1%} | {calls} |" for name, share, calls in result["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__)
    parser.add_argument("--case", choices=sorted(CASES), default="paper")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="override precision=auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(render(profile_steps(args.case, args.steps, args.warmup, args.precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model throughput: q2l's training step and evaluation against plain fp32 eager PyTorch.

Both sides build the same model from the same composed config with the same seed. The plain side
is what a first PyTorch script does: contiguous tensors, fp32, `torch.no_grad()` for inference,
`torch.optim.AdamW(model.parameters())` with its default implementation. The q2l side runs the
real `q2l.engine.train_one_epoch` / `q2l.engine.evaluate` with q2l's optimizer, under the best
CPU settings (`best_cpu_overrides`), so an improvement to the engine shows up here unchanged.

Also here: each lever on its own against the same plain baseline, and FLOPs per image with the
share of the machine's matmul peak that each side reaches.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import Row, Workload, interleaved, native_bf16
from q2l.amp import resolve_precision
from q2l.config import CONFIG_DIR, build_model
from q2l.engine import StepOptions, TrainState, evaluate, train_one_epoch

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ModelCase:
    """A model and batch shape to measure, as Hydra overrides of the training config.

    Random initial weights (`backbone.pretrained=false`): speed does not depend on them.
    """

    key: str
    title: str
    overrides: tuple[str, ...]
    num_classes: int


CASES = {
    "paper": ModelCase(
        "paper",
        "Q2L resnet50, 224 px, batch 8, paper head (D 2048, FFN 8192, 1 enc/2 dec, 4 heads)",
        ("backbone=resnet50", "backbone.pretrained=false", "model=q2l", "dataset.image_size=224",
         "dataset.batch_size=8"),
        num_classes=80,  # COCO
    ),
    "demo": ModelCase(
        "demo",
        "demo: resnet18, 64 px, batch 32, q2l_small head (D 256, FFN 1024)",
        ("backbone.pretrained=false",),
        num_classes=10,  # the digits data set
    ),
}


def best_cpu_overrides() -> tuple[str, ...]:
    """q2l's fastest CPU settings, as training-config overrides (docs/performance.md says why).

    bf16 autocast only where the CPU has bf16 matmul units; elsewhere it is emulated and slower.
    """
    overrides = ["trainer.channels_last=true", "optimizer.fused=true"]
    if native_bf16():
        overrides.append("trainer.precision=bf16")
    return tuple(overrides)


def compose_config(overrides: tuple[str, ...] | list[str]) -> DictConfig:
    """The training config with `overrides`, composed as train.py composes it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def build_case_model(case: ModelCase, cfg: DictConfig, seed: int = 0) -> nn.Module:
    """The case's model, initialised from `seed` so every side starts from the same weights."""
    torch.manual_seed(seed)
    return build_model(OmegaConf.to_container(cfg, resolve=True), case.num_classes)


def synthetic_batches(cfg: DictConfig, num_classes: int, steps: int, seed: int = 0) -> list:
    """`steps` (images, targets) batches of the config's shape; ~2.9 positives of 80 (COCO's rate)."""
    generator = torch.Generator().manual_seed(seed)
    size, batch = cfg.dataset.image_size, cfg.dataset.batch_size
    positive_rate = min(2.9 / num_classes, 0.5)
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator),
            (torch.rand(batch, num_classes, generator=generator) < positive_rate).float(),
        )
        for _ in range(steps)
    ]


def _count(batches: list) -> int:
    return sum(images.shape[0] for images, _ in batches)


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _keep_freed_memory(enabled: bool) -> None:
    """glibc malloc: serve every allocation from the heap and never return freed memory to the
    OS (enabled), or glibc's defaults. By default blocks above 32 MB are mmap-ed and unmapped on
    free, so each training step page-faults its large activations and bf16 weight copies afresh."""
    libc = _glibc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0 if enabled else 65536)
    libc.mallopt(m_trim_threshold, 2**31 - 1 if enabled else 128 * 1024)
    if not enabled:
        libc.malloc_trim(0)


def _set_adamw_implementation(optimizer: torch.optim.Optimizer, kind: str) -> None:
    """Switch an AdamW between its for-loop, foreach and fused implementations (same state)."""
    for group in optimizer.param_groups:
        group["foreach"] = kind == "foreach"
        group["fused"] = kind == "fused"


# ---- workloads -----------------------------------------------------------------------------------


def plain_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: list,
    precision: str = "fp32",
    channels_last: bool = False,
    adamw: str = "loop",
    sync_each_step: bool = False,
) -> Workload:
    """A hand-written training step: forward, ASL loss, backward, AdamW step; one option changed."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def run() -> int:
        model.train()
        for images, targets in batches:
            with _autocast(precision):
                logits = model(images.contiguous(memory_format=memory_format))
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sync_each_step:
                loss.item()  # what a loop that logs every step does
        return _count(batches)

    def prepare() -> None:
        _set_adamw_implementation(optimizer, adamw)
        _keep_freed_memory(False)

    return Workload(run, prepare=prepare)


def plain_inference(
    model: nn.Module,
    batches: list,
    precision: str = "fp32",
    channels_last: bool = False,
    grad_mode: str = "no_grad",
    autocast_per_batch: bool = True,
) -> Workload:
    """A hand-written evaluation loop. `autocast_per_batch=False` keeps one autocast region around
    all batches, so that under `no_grad` the bf16 copies of the weights are cast once per pass
    (under `inference_mode` autocast caches no casts at all)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    guard = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def run() -> int:
        model.eval()
        outer = contextlib.nullcontext() if autocast_per_batch else _autocast(precision)
        with guard(), outer:
            for images, _ in batches:
                with _autocast(precision) if autocast_per_batch else contextlib.nullcontext():
                    logits = model(images.contiguous(memory_format=memory_format))
                torch.sigmoid(logits.float())
        return _count(batches)

    return Workload(run, prepare=lambda: _keep_freed_memory(False))


def q2l_train(model: nn.Module, cfg: DictConfig, loss_fn: nn.Module, batches: list,
              optimizer: torch.optim.Optimizer) -> Workload:
    """q2l's own training loop (`q2l.engine.train_one_epoch`) under `cfg.trainer`'s settings."""
    # Far more steps than will run, so the one-cycle schedule never runs out.
    scheduler = instantiate(cfg.schedule)(optimizer, total_steps=1_000_000, steps_per_epoch=len(batches))
    precision = resolve_precision(cfg.trainer.precision.value, CPU)
    state = TrainState(model, loss_fn, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=precision == "fp16"))
    options = StepOptions(CPU, precision, cfg.trainer.channels_last, check_finite=False)

    def run() -> int:
        train_one_epoch(state, batches, options)
        return _count(batches)

    return Workload(run)


def q2l_inference(model: nn.Module, cfg: DictConfig, batches: list) -> Workload:
    """q2l's own evaluation loop (`q2l.engine.evaluate`) under `cfg.trainer`'s settings."""

    options = StepOptions(CPU, resolve_precision(cfg.trainer.precision.value, CPU), cfg.trainer.channels_last)

    def run() -> int:
        evaluate(model, batches, options)
        return _count(batches)

    return Workload(run)


@dataclass
class Sides:
    """What both sides of a case share: configs, models, optimizers, loss and data."""

    case: ModelCase
    plain_cfg: DictConfig
    q2l_cfg: DictConfig
    plain_model: nn.Module  # contiguous
    q2l_model: nn.Module  # in q2l's best memory format
    plain_optimizer: torch.optim.Optimizer
    q2l_optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    batches: list


@contextlib.contextmanager
def build_sides(case: ModelCase, steps: int) -> Iterator[Sides]:
    """Both sides of `case`; freed on exit (the paper model and its AdamW state take ~3 GB each)."""
    plain_cfg = compose_config(case.overrides)
    q2l_cfg = compose_config(case.overrides + best_cpu_overrides())
    plain_model = build_case_model(case, plain_cfg)
    q2l_model = build_case_model(case, q2l_cfg)
    if q2l_cfg.trainer.channels_last:
        q2l_model = q2l_model.to(memory_format=torch.channels_last)
    sides = Sides(
        case=case,
        plain_cfg=plain_cfg,
        q2l_cfg=q2l_cfg,
        plain_model=plain_model,
        q2l_model=q2l_model,
        plain_optimizer=torch.optim.AdamW(plain_model.parameters(), lr=1e-5),
        q2l_optimizer=instantiate(q2l_cfg.optimizer)(q2l_model),
        loss_fn=instantiate(plain_cfg.loss),
        batches=synthetic_batches(plain_cfg, case.num_classes, steps),
    )
    try:
        yield sides
    finally:
        del sides
        gc.collect()


# ---- sections ------------------------------------------------------------------------------------


def measure_throughput(sides: Sides, rounds: int, warmup: int = 1) -> tuple[list[Row], dict[str, float]]:
    """Section a: q2l's best settings against plain fp32 eager, training and inference.

    The matmul peaks of section e are measured in the same rounds, so they see the same load.
    Returns the rows and the best rates: images/s, and FLOP/s for the "peak_*" matmuls.
    """
    case, batches = sides.case, sides.batches
    train = interleaved(
        {
            "plain": plain_train(sides.plain_model, sides.plain_optimizer, sides.loss_fn, batches),
            "q2l": q2l_train(sides.q2l_model, sides.q2l_cfg, sides.loss_fn, batches, sides.q2l_optimizer),
            "peak_fp32": matmul_workload(torch.float32),
        },
        rounds,
        warmup,
    )
    infer = interleaved(
        {
            "plain": plain_inference(sides.plain_model, batches),
            "q2l": q2l_inference(sides.q2l_model, sides.q2l_cfg, batches),
            "peak_bf16": matmul_workload(torch.bfloat16),
        },
        rounds,
        warmup,
    )
    settings = ", ".join(best_cpu_overrides())
    rows = [
        Row("a. throughput", f"{case.key}: train step", train["q2l"].best, train["plain"].best, "img/s",
            "plain fp32 eager", note=f"q2l: {settings}"),
        Row("a. throughput", f"{case.key}: inference", infer["q2l"].best, infer["plain"].best, "img/s",
            "plain fp32 eager", note=f"q2l: {settings}"),
    ]
    rates = {"train_plain": train["plain"], "train_q2l": train["q2l"], "peak_fp32": train["peak_fp32"],
             "infer_plain": infer["plain"], "infer_q2l": infer["q2l"], "peak_bf16": infer["peak_bf16"]}
    return rows, {name: rate.best for name, rate in rates.items()}


def matmul_workload(dtype: torch.dtype, size: int = 2048, repeats: int = 4) -> Workload:
    """`repeats` (size × size) @ (size × size) matmuls; its "items" are FLOPs, so its rate is FLOP/s."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)

    def run() -> int:
        for _ in range(repeats):
            a @ b
        return 2 * size**3 * repeats

    return Workload(run)


def measure_levers(sides: Sides, rounds: int, warmup: int = 1, with_compile: bool = False) -> list[Row]:
    """Each lever alone against plain fp32 eager (same run, interleaved)."""
    case, batches, loss_fn = sides.case, sides.batches, sides.loss_fn
    model, optimizer = sides.plain_model, sides.plain_optimizer
    cl_model, cl_optimizer = sides.q2l_model, sides.q2l_optimizer
    channels_last = bool(sides.q2l_cfg.trainer.channels_last)
    train = {
        "plain": plain_train(model, optimizer, loss_fn, batches),
        "bf16 autocast": plain_train(model, optimizer, loss_fn, batches, precision="bf16"),
        "fused AdamW": plain_train(model, optimizer, loss_fn, batches, adamw="fused"),
        "foreach AdamW": plain_train(model, optimizer, loss_fn, batches, adamw="foreach"),
        "loss.item() every step": plain_train(model, optimizer, loss_fn, batches, sync_each_step=True),
    }
    if channels_last:
        train["channels_last"] = plain_train(cl_model, cl_optimizer, loss_fn, batches, channels_last=True)
    infer = {
        "plain": plain_inference(model, batches),
        "inference_mode": plain_inference(model, batches, grad_mode="inference_mode"),
        "bf16 autocast": plain_inference(model, batches, precision="bf16"),
        "bf16 autocast, one region": plain_inference(model, batches, precision="bf16",
                                                     autocast_per_batch=False),
    }
    if channels_last:
        infer["channels_last"] = plain_inference(cl_model, batches, channels_last=True)
    if _glibc() is not None:
        train["malloc keeps freed memory"] = _with_allocator(plain_train(model, optimizer, loss_fn, batches))
        infer["malloc keeps freed memory"] = _with_allocator(plain_inference(model, batches))
    if with_compile:
        compiled = torch.compile(model)
        train["torch.compile"] = plain_train(compiled, optimizer, loss_fn, batches)
        infer["torch.compile"] = plain_inference(compiled, batches)
    rows = []
    for kind, workloads in (("train step", train), ("inference", infer)):
        # Compilation happens in the first call: give compiled workloads an extra warm-up round.
        rates = interleaved(workloads, rounds, warmup + int(with_compile))
        rows += [
            Row("levers", f"{case.key} {kind}: {name}", rate.best, rates["plain"].best, "img/s",
                "plain fp32 eager")
            for name, rate in rates.items()
            if name != "plain"
        ]
    _set_adamw_implementation(optimizer, "loop")
    _keep_freed_memory(False)
    return rows


def _with_allocator(workload: Workload) -> Workload:
    """`workload` with glibc keeping freed memory; every other workload gets glibc's defaults."""
    return Workload(workload.run, prepare=lambda: (workload.prepare(), _keep_freed_memory(True)))


def count_flops(model: nn.Module, images: torch.Tensor, train: bool) -> float:
    """FLOPs per image of a forward pass (train=False) or a forward + backward pass (train=True)."""
    model.train(train)
    # The math attention backend is made of matmuls FlopCounterMode counts; the fused CPU kernel
    # is not counted at all.
    # Both passes run with autograd on: FlopCounterMode's module tracker fails on the label
    # embedding view a no_grad forward creates, and a forward costs the same FLOPs either way.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(images)
        if train:
            logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def case_flops(sides: Sides) -> dict[str, float]:
    """FLOPs per image of the case's model: forward, and forward + backward."""
    images = sides.batches[0][0][:2]
    return {
        "forward": count_flops(sides.plain_model, images, train=False),
        "train": count_flops(sides.plain_model, images, train=True),
    }


def flops_rows(key: str, q2l_precision: str, flops: dict[str, float], rates: dict[str, float],
               peaks: dict[str, float]) -> list[Row]:
    """Section e: FLOPs per image and the share of the matmul peak (FLOP/s) each side reaches."""
    q2l_peak = "bf16" if q2l_precision == "bf16" else "fp32"
    rows = [
        Row("e. flops", f"{key}: forward GFLOP/image", flops["forward"] / 1e9, None, "GFLOP"),
        Row("e. flops", f"{key}: train step GFLOP/image", flops["train"] / 1e9, None, "GFLOP"),
    ]
    for kind, per_image in (("train", flops["train"]), ("infer", flops["forward"])):
        for side, peak in (("plain", "fp32"), ("q2l", q2l_peak)):
            rows.append(Row(
                "e. flops", f"{key} {kind}: {side} achieved / {peak} matmul peak",
                per_image * rates[f"{kind}_{side}"] / 1e9, peaks[peak] / 1e9, "GFLOP/s",
                f"{peak} 2048² matmul peak", note="ratio = share of peak",
            ))
    return rows

"""Model throughput: q2l at its defaults against plain fp32 eager PyTorch and the official code.

Both q2l-model sides build the same model from the same composed config with the same seed. The
q2l side is q2l as `python train.py` runs it, with nothing overridden but the model case: the
config's defaults (trainer.precision=auto, trainer.channels_last=true, optimizer.fused=true, the
weight EMA, the finiteness check) through the real `q2l.training.engine.train_one_epoch` and
`q2l.training.engine.evaluate`, so a change to the engine or to a default shows up here unchanged.
The plain side is what a first PyTorch script does: contiguous tensors, fp32, `torch.no_grad()` for
inference, `torch.optim.AdamW(model.parameters())` with its default implementation, no EMA.

With a checkout of the official Query2Label code (benchmarks/official.py), the paper case also
runs the official model, loss and training loop on the same batches, in the same rounds.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmarks import official
from benchmarks.timing import Rates, Row, Workload, compare, interleaved
from q2l.config import CONFIG_DIR
from q2l.training.build import build_model, build_state, step_options
from q2l.training.engine import StepOptions, TrainState, evaluate, train_one_epoch
from q2l.utils.amp import autocast, resolve_precision

CPU = torch.device("cpu")
OFFICIAL_TARGET = 2.0  # q2l at its defaults, training and inference, against the official code


@dataclass(frozen=True)
class ModelCase:
    """A model and batch shape to measure, as Hydra overrides of the training config.

    Random initial weights (`backbone.pretrained=false`): speed does not depend on them. The data
    set option only lets the config compose: the batches are synthetic.
    """

    key: str
    title: str
    overrides: tuple[str, ...]
    num_classes: int


CASES = {
    "paper": ModelCase(
        "paper",
        "Q2L resnet50, 224 px, batch 8, paper head (D 2048, FFN 8192, 1 enc/2 dec, 4 heads, "
        "no decoder self-attention, no input projection, post-norm, dropout 0.1): the official "
        "code's architecture",
        (
            "dataset=coco2014",
            "dataset.root=unused",
            "dataset.image_size=224",
            "dataset.batch_size=8",
            "backbone=resnet50",
            "backbone.pretrained=false",
            "model=q2l",
            "model.input_proj=false",
            # The official layout, not q2l's default (pre-norm, dropout 0): the same architecture.
            "model.norm=post",
            "model.dropout=0.1",
        ),
        num_classes=80,  # COCO
    ),
    "demo": ModelCase(
        "demo",
        "demo: resnet10t, 64 px, batch 32, q2l_small head (D 256, FFN 1024)",
        ("experiment=demo", "backbone.pretrained=false"),
        num_classes=10,  # the digits data set
    ),
}


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
    """`steps` (images, targets) batches of the config's shape, 2.9 positives in 80 like COCO."""
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


def count_images(batches: list) -> int:
    return sum(images.shape[0] for images, _ in batches)


def q2l_state(cfg: DictConfig, model: nn.Module, loss: nn.Module) -> tuple[TrainState, StepOptions]:
    """The training state and step options `python train.py` builds around `model` from `cfg`
    (q2l.training.run's own builders), with a schedule far longer than will run."""
    precision = resolve_precision(cfg.trainer.precision.value, CPU)
    long_enough = 1_000_000 * cfg.dataset.batch_size
    state = build_state(cfg, model, loss, long_enough, precision)
    return state, step_options(cfg, CPU, precision, num_classes=model.num_classes)


def defaults_note(cfg: DictConfig, options: StepOptions) -> str:
    """The settings the q2l side ran with, for the table's footnotes."""
    trainer = cfg.trainer
    ema = f"EMA {trainer.ema_decay}" if trainer.ema_decay > 0 else "no EMA"
    return (
        f"q2l at its defaults: precision={trainer.precision.value} (-> {options.precision}), "
        f"channels_last={trainer.channels_last}, optimizer.fused={cfg.optimizer.fused}, {ema}, "
        f"check_finite={trainer.check_finite}"
    )


# ---- workloads -----------------------------------------------------------------------------------


def plain_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: list,
    precision: str = "fp32",
    channels_last: bool = False,
    adamw: str = "loop",
) -> Workload:
    """A hand-written training step: forward, loss, backward, AdamW step; at most one lever on."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def run() -> int:
        model.train()
        for images, targets in batches:
            with autocast(CPU, precision):
                logits = model(images.contiguous(memory_format=memory_format))
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return count_images(batches)

    return Workload(run, prepare=lambda: set_adamw_implementation(optimizer, adamw))


def plain_inference(
    model: nn.Module,
    batches: list,
    precision: str = "fp32",
    channels_last: bool = False,
    grad_mode: str = "no_grad",
) -> Workload:
    """A hand-written evaluation loop: forward and sigmoid per batch; at most one lever on."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    guard = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def run() -> int:
        model.eval()
        with guard():
            for images, _ in batches:
                with autocast(CPU, precision):
                    logits = model(images.contiguous(memory_format=memory_format))
                torch.sigmoid(logits.float())
        return count_images(batches)

    return Workload(run)


def set_adamw_implementation(optimizer: torch.optim.Optimizer, kind: str) -> None:
    """Switch an AdamW between its for-loop and fused implementations (same state)."""
    for group in optimizer.param_groups:
        group["foreach"] = False
        group["fused"] = kind == "fused"


def q2l_train(
    state: TrainState, options: StepOptions, batches: list, frozen: list[nn.Parameter] = ()
) -> Workload:
    """q2l's own training loop (`q2l.training.engine.train_one_epoch`). `frozen` parameters are set
    to requires_grad=False before each run (and back to True otherwise)."""
    trainable = [p for p in state.model.parameters() if p.requires_grad]

    def prepare() -> None:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for parameter in frozen:
            parameter.requires_grad_(False)

    def run() -> int:
        train_one_epoch(state, batches, options)
        return count_images(batches)

    return Workload(run, prepare=prepare, keep_freed_memory=True)


def q2l_forward_backward(
    model: nn.Module, options: StepOptions, loss_fn: nn.Module, batches: list
) -> Workload:
    """Only the forward and backward passes of q2l's step, at its precision and memory format: no
    optimizer step, no EMA, no finiteness check. Not a way to train; the ceiling a full step's
    share of the matmul peak cannot pass (section e), measured in the same rounds."""
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format

    def run() -> int:
        model.train()
        for images, targets in batches:
            with autocast(options.device, options.precision):
                logits = model(images.contiguous(memory_format=memory_format))
            loss_fn(logits.float(), targets).backward()
            model.zero_grad(set_to_none=True)
        return count_images(batches)

    return Workload(run, keep_freed_memory=True)


def q2l_inference(model: nn.Module, options: StepOptions, batches: list) -> Workload:
    """q2l's own evaluation loop (`q2l.training.engine.evaluate`)."""
    options = StepOptions(
        options.device, precision=options.precision, channels_last=options.channels_last
    )

    def run() -> int:
        evaluate(model, batches, options)
        return count_images(batches)

    # As validation runs inside `python train.py`.
    return Workload(run, keep_freed_memory=True)


def stem_and_layer1(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the official code never trains: the ResNet stem and layer1."""
    body = model.backbone.body
    return [p for part in (body.conv1, body.bn1, body.layer1) for p in part.parameters()]


@dataclass
class Sides:
    """What the sides of a case share: config, models, optimizers, loss and data."""

    case: ModelCase
    cfg: DictConfig  # q2l's defaults for the case
    plain_model: nn.Module  # contiguous fp32
    plain_optimizer: torch.optim.Optimizer
    state: TrainState  # q2l's: model in its default memory format, optimizer, schedule, EMA
    options: StepOptions
    loss_fn: nn.Module
    batches: list


@contextlib.contextmanager
def build_sides(case: ModelCase, steps: int) -> Iterator[Sides]:
    """Both sides of `case`; freed on exit (the paper model and its AdamW state take ~3 GB each)."""
    cfg = compose_config(case.overrides)
    loss_fn = instantiate(cfg.loss)
    plain_model = build_case_model(case, cfg)
    state, options = q2l_state(cfg, build_case_model(case, cfg), loss_fn)
    sides = Sides(
        case=case,
        cfg=cfg,
        plain_model=plain_model,
        plain_optimizer=torch.optim.AdamW(plain_model.parameters(), lr=1e-5, foreach=False),
        state=state,
        options=options,
        loss_fn=loss_fn,
        batches=synthetic_batches(cfg, case.num_classes, steps),
    )
    try:
        yield sides
    finally:
        del sides
        gc.collect()


# ---- section a -----------------------------------------------------------------------------------


def measure_throughput(
    sides: Sides, rounds: int, official_code: official.OfficialCode | None = None, warmup: int = 1
) -> tuple[list[Row], dict[str, Rates]]:
    """Section a: q2l at its defaults against plain fp32 eager and, for the paper case with a
    checkout, the official code; training and inference in interleaved rounds.

    The matmul peaks of section e are measured in the same rounds, so they see the same load.
    Returns the rows and every workload's rates ("peak_*" in FLOP/s, the others in images/s).
    """
    case, batches, state = sides.case, sides.batches, sides.state
    train = {
        "plain": plain_train(sides.plain_model, sides.plain_optimizer, sides.loss_fn, batches),
        "q2l": q2l_train(state, sides.options, batches),
        "q2l forward+backward": q2l_forward_backward(
            state.model, sides.options, sides.loss_fn, batches
        ),
        "peak_fp32": matmul_workload(torch.float32),
    }
    infer = {
        "plain": plain_inference(sides.plain_model, batches),
        "q2l": q2l_inference(state.model, sides.options, batches),
        "peak_bf16": matmul_workload(torch.bfloat16),
    }
    official_model = None
    if official_code is not None:
        official_model = official.build_model(official_code, case.num_classes)
        frozen = stem_and_layer1(state.model)
        train["q2l, stem+layer1 frozen"] = q2l_train(state, sides.options, batches, frozen)
        train["official"] = official.train_workload(official_code, official_model, batches)
        infer["official"] = official.inference_workload(official_code, official_model, batches)
    try:
        train_rates = interleaved(train, rounds, warmup)
        infer_rates = interleaved(infer, rounds, warmup)
    finally:
        train["q2l"].prepare()  # every parameter trainable again
        del official_model, train, infer
        gc.collect()

    note = defaults_note(sides.cfg, sides.options)
    rows = [
        compare(
            "a. throughput",
            f"{case.key}: train step",
            train_rates["q2l"],
            train_rates["plain"],
            "img/s",
            "plain fp32 eager",
            note=note,
        ),
        compare(
            "a. throughput",
            f"{case.key}: inference",
            infer_rates["q2l"],
            infer_rates["plain"],
            "img/s",
            "plain fp32 eager",
            note=note,
        ),
    ]
    if official_code is not None:
        rows += official_rows(case.key, train_rates, infer_rates, note)
    rates = {f"train_{name}": rate for name, rate in train_rates.items()}
    rates.update({f"infer_{name}": rate for name, rate in infer_rates.items()})
    rates["peak_fp32"], rates["peak_bf16"] = train_rates["peak_fp32"], infer_rates["peak_bf16"]
    return rows, rates


def official_rows(
    key: str, train: dict[str, Rates], infer: dict[str, Rates], note: str
) -> list[Row]:
    """q2l at its defaults, and plain fp32 eager q2l, against the official code."""
    section, base = "a. vs official", "official Q2L code, fp32 (its AMP is CUDA-only)"
    trains_less = (
        "q2l trains every layer; the official code freezes the stem, layer1 and all BatchNorm"
    )
    return [
        compare(
            section,
            f"{key}: train step, q2l defaults",
            train["q2l"],
            train["official"],
            "img/s",
            base,
            target=OFFICIAL_TARGET,
            note=f"{note}; {trains_less}",
        ),
        compare(
            section,
            f"{key}: train step, q2l defaults, stem+layer1 frozen",
            train["q2l, stem+layer1 frozen"],
            train["official"],
            "img/s",
            base,
            target=OFFICIAL_TARGET,
            note=f"{note}; stem+layer1 requires_grad_(False) as in the official code, "
            "BatchNorm of layer2-4 still trained",
        ),
        compare(
            section,
            f"{key}: train step, plain fp32 eager q2l",
            train["plain"],
            train["official"],
            "img/s",
            base,
            note="same architecture, no q2l settings",
        ),
        compare(
            section,
            f"{key}: inference, q2l defaults",
            infer["q2l"],
            infer["official"],
            "img/s",
            base,
            target=OFFICIAL_TARGET,
            note=note,
        ),
        compare(
            section,
            f"{key}: inference, plain fp32 eager q2l",
            infer["plain"],
            infer["official"],
            "img/s",
            base,
            note="same architecture, no q2l settings",
        ),
    ]


def matmul_workload(dtype: torch.dtype, size: int = 2048, repeats: int = 4) -> Workload:
    """`repeats` (size × size) @ (size × size) matmuls; its "items" are FLOPs, its rate FLOP/s."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)

    def run() -> int:
        for _ in range(repeats):
            a @ b
        return 2 * size**3 * repeats

    return Workload(run)

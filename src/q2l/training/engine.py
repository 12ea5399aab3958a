"""The two loops, one training pass and one evaluation pass (q2l.training.trainer owns epochs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn

from q2l.utils.amp import autocast
from q2l.utils.threads import rebalance_threads

Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm stopped being finite; raised before any weight changed."""


@dataclass
class TrainState:
    """Everything a training step changes; a checkpoint saves and restores all of it.

    `forward` is what the step calls: the model itself, or a compiled or DDP-wrapped view of it;
    `model` is the plain module whose weights are saved.
    """

    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None = None
    forward: nn.Module | None = None
    step: int = 0  # optimizer steps taken (drives the EMA warm-up)

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model


def _finite_here(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value))


@dataclass(frozen=True)
class StepOptions:
    """How steps run: device, autocast precision, memory format, accumulation, clipping, checks.

    accumulate: batches per optimizer step; gradients of all but the last skip the DDP all-reduce
        (`no_sync`), and each batch's loss is divided by the group's size, so k batches of B
        give the step one batch of k*B would.
    check_finite: raise NonFiniteError before the optimizer step when the loss or gradient norm
        is not finite (one host sync per step). Under fp16 the loss scaler owns inf/NaN gradients
        instead: it skips the step, and `on_step` is told.
    is_finite: the loss check; under DDP a collective (q2l.utils.dist.any_rank) so that every rank
        stops at the same step.
    batch_transform: (images, targets) -> (images, targets) on the device before the forward pass
        (MixUp/CutMix, q2l.data.mix).
    decode: (encoded batch, targets) -> (images, targets) on the device, for loaders that hand
        over files rather than images (dataset.decode=device, q2l.data.device_decode).
    """

    device: torch.device
    _: KW_ONLY  # the rest by name: positional options would silently shift when one is added
    precision: str = "fp32"
    channels_last: bool = False
    accumulate: int = 1
    grad_clip_norm: float | None = None
    check_finite: bool = True
    is_finite: Callable[[torch.Tensor], bool] = _finite_here
    batch_transform: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None
    decode: Callable[[object, torch.Tensor], Batch] | None = None


def train_one_epoch(
    state: TrainState,
    batches: Iterable[Batch],
    options: StepOptions,
    on_step: Callable[[torch.Tensor, bool, int], bool] | None = None,
) -> int:
    """One optimizer step per `options.accumulate` batches of images (B, 3, H, W) and targets
    (B, K) (the last step of a pass may take fewer); returns the batches consumed.

    on_step(loss, skipped, batches) runs after every step with the detached fp32 loss (mean over
    the step's batches), whether the fp16 loss scaler skipped the update and how many batches the
    step took; returning True ends the pass (stop requests).
    """
    state.forward.train()
    consumed = 0
    for group in _groups(batches, options.accumulate):
        loss, skipped = _train_step(state, group, options)
        consumed += len(group)
        rebalance_threads()  # between steps: fewer intra-op threads while neighbours are busy
        if on_step is not None and on_step(loss, skipped, len(group)):
            break
    return consumed


def _groups(batches: Iterable[Batch], size: int):
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _train_step(
    state: TrainState, group: list[Batch], options: StepOptions
) -> tuple[torch.Tensor, bool]:
    """Forward and backward over the group (fp32 loss), clip, optimizer and schedule step, EMA."""
    step = state.step + 1
    scaler = state.scaler
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=options.device)
    for index, (images, targets) in enumerate(group):
        last = index == len(group) - 1
        skip_sync = getattr(state.forward, "no_sync", None)  # DDP: all-reduce once, after the last
        with contextlib.nullcontext() if last or skip_sync is None else skip_sync():
            loss = _forward_loss(state, images, targets, options)
            scaler.scale(loss / len(group)).backward()
        total += loss.detach()
    loss = total / len(group)
    # Once per step, after every accumulated batch (a non-finite one makes the mean non-finite):
    # one host sync, and under DDP one collective, rather than one per batch.
    if options.check_finite and not options.is_finite(loss):
        where = f"({loss.item()})" if not torch.isfinite(loss) else "on another process"
        raise NonFiniteError(
            f"loss is not finite at step {step} {where}; stopped before the optimizer step"
        )

    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    if options.grad_clip_norm is not None or (options.check_finite and scale_before is None):
        scaler.unscale_(state.optimizer)  # clip the true gradient, not the scaled one
        params = [p for p in state.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if options.check_finite and scale_before is None and not torch.isfinite(norm):
            raise NonFiniteError(
                f"gradient norm is {norm.item()} at step {step} (loss {loss.item():.4g}); "
                "stopped before the optimizer step"
            )
        # Only when asked: multiplying by a clip factor of 1 reads and writes every gradient
        # (1.4 GB per step for the paper model's 175 M parameters) and changes nothing.
        if options.grad_clip_norm is not None:
            # It scales the .grad of what it is given: the parameters, not their gradients.
            torch.nn.utils.clip_grads_with_norm_(params, options.grad_clip_norm, norm)
    scaler.step(state.optimizer)
    scaler.update()
    skipped = scale_before is not None and scaler.get_scale() < scale_before
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model, step=state.step)
    state.step = step
    return loss, skipped


def _forward_loss(
    state: TrainState, images: torch.Tensor, targets: torch.Tensor, options: StepOptions
) -> torch.Tensor:
    if options.decode is not None:
        images, targets = options.decode(images, targets)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    images = images.to(options.device, non_blocking=True, memory_format=memory_format)
    targets = targets.to(options.device, non_blocking=True)
    if options.batch_transform is not None:
        images, targets = options.batch_transform(images, targets)
    with autocast(options.device, options.precision):
        logits = state.forward(images)  # (B, K)
    return state.loss(
        logits.float(), targets
    )  # fp32 outside autocast: ASL's eps underflows in fp16


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    options: StepOptions,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores (N, K) float32 probabilities and targets (N, K) float32, both on CPU.

    should_stop: polled after every batch; when it returns True the pass ends and None is
        returned (a stop request arriving during a long validation).
    """
    model.eval()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    all_scores, all_targets = [], []
    for images, targets in batches:
        images = images.to(options.device, non_blocking=True, memory_format=memory_format)
        with autocast(options.device, options.precision):
            logits = model(images)
        all_scores.append(torch.sigmoid(logits.float()).cpu())
        all_targets.append(targets)
        rebalance_threads()
        if should_stop is not None and should_stop():
            return None
    return torch.cat(all_scores), torch.cat(all_targets).float()

"""The two loops: one training epoch and one evaluation pass. The composition root owns the rest."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm stopped being finite; raised before any weight changed."""


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one mixed-precision context: autocast to bf16/fp16, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    precision: str = "fp32",
    ema: nn.Module | None = None,
    grad_clip_norm: float | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
    global_step: int = 0,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor, bool], bool] | None = None,
    check_finite: bool = True,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Train over `loader` once.

    Args:
        global_step: optimizer steps taken before this epoch (drives the EMA warm-up).
        on_step: called after every step with (steps done in this call, loss, whether the fp16
            loss scaler skipped the update); returning True ends the epoch early (stop requests).
        check_finite: raise NonFiniteError before the optimizer step when the loss or the gradient
            norm is not finite (one host sync per step). Under fp16 the loss scaler owns inf/NaN
            gradients instead: it skips the step, and on_step is told.
        batch_transform: (images (B, C, H, W), targets (B, K)) -> the same, on the device, before
            the forward pass (MixUp/CutMix: q2l.data.mix).
    Returns:
        loss (mean over steps), lr (last), images_per_sec, steps.
    """
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    steps = images_seen = 0
    start = time.perf_counter()
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    for images, targets in tqdm(loader, total=total, disable=not progress, leave=False, desc="train"):
        if max_steps is not None and steps >= max_steps:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        with autocast(device, precision):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)  # fp32 outside autocast: ASL's eps underflows in fp16

        if check_finite and not torch.isfinite(loss):
            raise NonFiniteError(f"loss is {loss.item()} at step {global_step + steps + 1}; stopped before "
                                 "the optimizer step")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        if grad_clip_norm is not None or (check_finite and scale_before is None):
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            # max_norm=inf measures without clipping when only the finiteness check needs the norm.
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm or math.inf)
            if check_finite and scale_before is None and not torch.isfinite(norm):
                raise NonFiniteError(f"gradient norm is {norm.item()} at step {global_step + steps + 1} "
                                     f"(loss {loss.item():.4g}); stopped before the optimizer step")
        scaler.step(optimizer)
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        scheduler.step()
        if ema is not None:
            ema.update(model, step=global_step + steps)

        loss_sum += loss.detach()  # accumulated on the device: no sync beyond the finiteness check
        steps += 1
        images_seen += images.shape[0]
        if on_step is not None and on_step(steps, loss.detach(), skipped):
            break
    elapsed = time.perf_counter() - start
    return {
        "loss": (loss_sum / max(steps, 1)).item(),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_sec": images_seen / max(elapsed, 1e-9),
        "steps": steps,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    max_steps: int | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores and targets over `loader`.

    Args:
        should_stop: polled after every batch; when it returns True the pass ends and None is
            returned (a stop request arriving during a long validation).
    Returns:
        scores (N, K) float32 probabilities on CPU, targets (N, K) float32 on CPU; or None.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    all_scores, all_targets = [], []
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    for step, (images, targets) in enumerate(
        tqdm(loader, total=total, disable=not progress, leave=False, desc="eval")
    ):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast(device, precision):
            logits = model(images)
        all_scores.append(torch.sigmoid(logits.float()).cpu())
        all_targets.append(targets)
        if should_stop is not None and should_stop():
            return None
    return torch.cat(all_scores), torch.cat(all_targets).float()

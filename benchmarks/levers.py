"""Each of q2l's default speed settings on its own, against plain fp32 eager PyTorch.

q2l's defaults combine bf16 autocast (trainer.precision=auto on a CPU with bf16 units),
channels_last convolutions and fused AdamW, in a process whose malloc keeps freed memory
(q2l.utils.allocator); evaluation runs under `torch.inference_mode`. Here
each of them is switched on alone in the hand-written plain loop, so its own share is visible;
section a measures them together through q2l's engine. `--compile` adds torch.compile, after
checking that the compiled model gives the eager model's logits.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from benchmarks.throughput import Sides, plain_inference, plain_train, set_adamw_implementation
from benchmarks.timing import Row, compare, interleaved

BASELINE = "plain fp32 eager"


def measure_levers(
    sides: Sides, rounds: int, warmup: int = 1, with_compile: bool = False
) -> list[Row]:
    """Rows "<case> train step: <lever>" and "<case> inference: <lever>" vs plain fp32 eager."""
    case, batches, loss_fn = sides.case, sides.batches, sides.loss_fn
    model, optimizer = sides.plain_model, sides.plain_optimizer
    # The channels_last lever runs q2l's model (already NHWC) with its own for-loop AdamW.
    nhwc_model = sides.state.model.to(memory_format=torch.channels_last)
    nhwc_optimizer = torch.optim.AdamW(nhwc_model.parameters(), lr=1e-5, foreach=False)
    train = {
        "plain": plain_train(model, optimizer, loss_fn, batches),
        "bf16 autocast": plain_train(model, optimizer, loss_fn, batches, precision="bf16"),
        "channels_last": plain_train(
            nhwc_model, nhwc_optimizer, loss_fn, batches, channels_last=True
        ),
        "fused AdamW": plain_train(model, optimizer, loss_fn, batches, adamw="fused"),
        "malloc keeps freed memory": replace(
            plain_train(model, optimizer, loss_fn, batches), keep_freed_memory=True
        ),
    }
    infer = {
        "plain": plain_inference(model, batches),
        "bf16 autocast": plain_inference(model, batches, precision="bf16"),
        "channels_last": plain_inference(nhwc_model, batches, channels_last=True),
        "inference_mode": plain_inference(model, batches, grad_mode="inference_mode"),
        "malloc keeps freed memory": replace(
            plain_inference(model, batches), keep_freed_memory=True
        ),
    }
    notes = {}
    if with_compile:
        compiled = torch.compile(model)
        notes["torch.compile"] = compiled_difference(model, compiled, batches[0][0])
        train["torch.compile"] = plain_train(compiled, optimizer, loss_fn, batches)
        infer["torch.compile"] = plain_inference(compiled, batches)
    rows = []
    for kind, workloads in (("train step", train), ("inference", infer)):
        # Compilation happens in the first call: compiled workloads get an extra warm-up round.
        rates = interleaved(workloads, rounds, warmup + int(with_compile))
        rows += [
            compare(
                "levers",
                f"{case.key} {kind}: {name}",
                rate,
                rates["plain"],
                "img/s",
                BASELINE,
                note=notes.get(name, ""),
            )
            for name, rate in rates.items()
            if name != "plain"
        ]
    set_adamw_implementation(optimizer, "loop")
    del nhwc_optimizer
    return rows


def compiled_difference(model: nn.Module, compiled: nn.Module, images: torch.Tensor) -> str:
    """Check that `compiled` gives `model`'s logits (eval mode, fp32); the note for its rows.

    Raises AssertionError beyond float32 reordering error (1e-4 of the largest logit).
    """
    model.eval()
    with torch.no_grad():
        eager, fast = model(images), compiled(images)
    difference = (fast - eager).abs().max().item()
    bound = 1e-4 * max(eager.abs().max().item(), 1.0)
    if not difference <= bound:
        raise AssertionError(f"torch.compile changed the logits by {difference:.2e} > {bound:.2e}")
    return f"compiled logits equal eager's: max |difference| {difference:.1e}"

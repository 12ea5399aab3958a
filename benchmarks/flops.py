"""FLOPs per image of a case's model, and the share of the machine's matmul peak each side reaches.

The peak is the best rate of a 2048² matmul in fp32 and in bf16, measured standalone and in the
same rounds as section a; achieved FLOP/s = FLOPs per image × the side's median images/s.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.throughput import Sides
from benchmarks.timing import Row


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


def flops_rows(
    key: str,
    q2l_precision: str,
    flops: dict[str, float],
    images_per_s: dict[str, float],
    peaks: dict[str, float],
) -> list[Row]:
    """Section e: FLOPs per image and the share of the matmul peak (FLOP/s) each side reaches.

    images_per_s: "train_plain", "train_q2l", "train_q2l forward+backward", "infer_plain",
    "infer_q2l"; peaks: "fp32", "bf16".
    """
    q2l_peak = "bf16" if q2l_precision == "bf16" else "fp32"
    rows = [
        Row("e. flops", f"{key}: forward GFLOP/image", flops["forward"] / 1e9, None, "GFLOP"),
        Row("e. flops", f"{key}: train step GFLOP/image", flops["train"] / 1e9, None, "GFLOP"),
    ]
    for kind, per_image in (("train", flops["train"]), ("infer", flops["forward"])):
        for side, peak in (("plain", "fp32"), ("q2l", q2l_peak)):
            rows.append(
                Row(
                    "e. flops",
                    f"{key} {kind}: {side} achieved / {peak} matmul peak",
                    per_image * images_per_s[f"{kind}_{side}"] / 1e9,
                    peaks[peak] / 1e9,
                    "GFLOP/s",
                    f"{peak} 2048² matmul peak",
                    note="ratio = share of peak",
                )
            )
    # The ceiling: the same model's forward and backward passes alone (no optimizer, no EMA), at
    # q2l's precision and memory format. A full step's share cannot pass it.
    rows.append(
        Row(
            "e. flops",
            f"{key} train: q2l forward+backward alone / {q2l_peak} matmul peak",
            flops["train"] * images_per_s["train_q2l forward+backward"] / 1e9,
            peaks[q2l_peak] / 1e9,
            "GFLOP/s",
            f"{q2l_peak} 2048² matmul peak",
            note="ratio = share of peak; the ceiling of the train step's share",
        )
    )
    return rows

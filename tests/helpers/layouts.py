"""Weights in other projects' layouts, built from timm/torchvision models for the loading tests."""

from __future__ import annotations

import re

import torch
from torch import nn


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Random weights and BatchNorm statistics (positive scales), so equality means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.rand(tensor.shape, generator=generator)
            if key.endswith(("running_var", "weight")) and tensor.ndim == 1:
                tensor.copy_(0.5 + values)  # norm scales and variances: positive
            else:
                tensor.copy_((values - 0.5) * 0.2)


def miil_tresnet_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm TResNet's weights as Alibaba-MIIL's inplace_abn TResNet names them: ConvNormAct
    `conv`/`bn` are Sequential indices 0/1, nested one deeper where an anti-alias blur follows the
    convolution; InPlaceABN stores |scale| - eps and no step counter."""
    original = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        match = re.match(r"(.*)\.(conv|bn)\.(\w+)$", key)
        if match is None:  # squeeze-excitation fc1/fc2: same names
            original[key] = value
            continue
        owner, part, leaf = match.groups()
        index = {"conv": "0", "bn": "1"}[part]
        blur = getattr(model.get_submodule(owner), "aa", None)
        if blur is not None and not isinstance(blur, nn.Identity):
            index = f"0.{index}"
        if part == "bn" and leaf == "weight":
            value = value - 1e-5  # inplace_abn computes with |weight| + eps
        original[f"{owner}.{index}.{leaf}"] = value
    return original

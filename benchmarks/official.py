"""The official Query2Label code (SlongLiu/query2labels), imported from a local checkout.

Nothing of it is copied here. `--official PATH` (or the Q2L_OFFICIAL_CODE environment variable)
names a checkout; `load` imports its `lib/` and `main_mlc.py` from there and applies the shims a
CPU-only machine needs at import time, without touching its files:

- `lib/models/__init__.py` is not run: it imports every backbone family (TResNet needs
  `inplace_abn`, CvT `einops`, `resnet.py` a torchvision module that no longer exists). `models`
  and `utils` become bare packages over the checkout's folders; `models.cls_cvt` and
  `models.swin_transformer`, which only the other backbones use, are stubs.
- `utils.slconfig` (config files; needs `addict` and `yapf`) is a stub: nothing here uses it.
- The ResNet is built with `weights=None` where the code asks torchvision for `pretrained=True`
  (a download; speed does not depend on the weights).
- `ModelEma` lives in `main_mlc.py`, whose imports need the data sets, TensorBoard and a CUDA
  process group: only that class is compiled from the file's source.

The model is built by the code's own `build_q2l` from `main_mlc.py`'s argument defaults, with the
paper setting this comparison uses; its training step and evaluation follow `main_mlc.train` and
`main_mlc.validate` on the CPU: fp32 (its AMP is CUDA-only), `AsymmetricLossOptimized`,
`loss.item()` every step, AdamW over the parameters that require grad, OneCycleLR, and the EMA.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks.timing import Workload

ENV_VAR = "Q2L_OFFICIAL_CODE"
HOW_TO_SUPPLY = (
    "to compare with the official Query2Label code, pass --official PATH (make bench "
    f'ARGS="--official PATH") or set {ENV_VAR}=PATH, PATH being a checkout of '
    "https://github.com/SlongLiu/query2labels (its lib/ and main_mlc.py are enough)"
)

# main_mlc.py's argument defaults, with the paper's ResNet-50 setting at 224 px.
PAPER_ARGS = {
    "backbone": "resnet50",
    "img_size": 224,
    "num_class": 80,
    "pretrained": False,
    "hidden_dim": 2048,
    "dim_feedforward": 8192,
    "enc_layers": 1,
    "dec_layers": 2,
    "nheads": 4,
    "dropout": 0.1,
    "pre_norm": False,
    "position_embedding": "sine",
    "keep_other_self_attn_dec": False,
    "keep_first_self_attn_dec": False,
    "keep_input_proj": False,
    # Loss and optimizer, as main_mlc.py sets them up.
    "gamma_neg": 2,
    "gamma_pos": 0,
    "loss_clip": 0.0,
    "eps": 1e-5,
    "dtgfl": False,
    "lr": 1e-4,
    "weight_decay": 1e-2,
    "ema_decay": 0.9997,
}


@dataclass
class OfficialCode:
    """What the comparison needs from a checkout."""

    root: Path
    build_q2l: types.FunctionType
    loss_class: type
    ema_class: type


def locate(path: str | None) -> Path | None:
    """The checkout named by `path` or Q2L_OFFICIAL_CODE; None when neither is set.

    Raises FileNotFoundError when the path is set but holds no `lib/models/query2label.py`.
    """
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return None
    root = Path(path).expanduser().resolve()
    if not (root / "lib" / "models" / "query2label.py").is_file():
        raise FileNotFoundError(
            f"{root} is not a checkout of SlongLiu/query2labels: no lib/models/query2label.py"
        )
    return root


def load(root: Path) -> OfficialCode:
    """Import the official model, loss and EMA from the checkout at `root`, with the CPU shims."""
    lib = root / "lib"
    with _packages({"models": lib / "models", "utils": lib / "utils"}) as modules:
        modules["models.cls_cvt"] = _stub("models.cls_cvt", "build_CvT")
        modules["models.swin_transformer"] = _stub(
            "models.swin_transformer", "build_swin_transformer"
        )
        modules["utils.slconfig"] = _stub("utils.slconfig", "SLConfig")
        # From the checkout, under the shims.
        import models.aslloss
        import models.backbone
        import models.query2label

        models.backbone.torchvision = types.SimpleNamespace(models=_WithoutDownload())
        build_q2l = models.query2label.build_q2l
        loss_class = models.aslloss.AsymmetricLossOptimized
    return OfficialCode(root, build_q2l, loss_class, _model_ema_class(root / "main_mlc.py"))


def build_model(code: OfficialCode, num_classes: int, seed: int = 0) -> nn.Module:
    """The official Q2L model in the paper setting, with random weights drawn from `seed`."""
    args = argparse.Namespace(**{**PAPER_ARGS, "num_class": num_classes})
    torch.manual_seed(seed)
    with _quiet():  # build_q2l prints "set model.input_proj to Indentify!"
        return code.build_q2l(args)


def train_workload(code: OfficialCode, model: nn.Module, batches: list) -> Workload:
    """main_mlc.train's step on the CPU: forward, loss, loss.item(), backward, AdamW, OneCycle,
    EMA update."""
    args = argparse.Namespace(**PAPER_ARGS)
    criterion = _criterion(code, args)
    batch_size = batches[0][0].shape[0]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.requires_grad]}],
        args.lr * batch_size / 256,  # main_mlc.py's lr_mult
        betas=(0.9, 0.999),
        eps=1e-08,
        weight_decay=args.weight_decay,
    )
    # Far more steps than will run, so the schedule never runs out.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, steps_per_epoch=len(batches), epochs=100_000, pct_start=0.2
    )
    ema = code.ema_class(model, args.ema_decay)

    def run() -> int:
        model.train()
        for images, targets in batches:
            output = model(images)
            loss = criterion(output, targets)
            loss.item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.update(model)
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run)


def inference_workload(code: OfficialCode, model: nn.Module, batches: list) -> Workload:
    """main_mlc.validate on the CPU: no_grad forward, loss, sigmoid, scores and targets kept."""
    criterion = _criterion(code, argparse.Namespace(**PAPER_ARGS))

    def run() -> int:
        model.eval()
        saved = []
        with torch.no_grad():
            for images, targets in batches:
                output = model(images)
                loss = criterion(output, targets)
                scores = torch.sigmoid(output)
                loss.item()
                saved.append(torch.cat((scores.detach().cpu(), targets.detach().cpu()), 1))
        torch.cat(saved)
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run)


def _criterion(code: OfficialCode, args: argparse.Namespace) -> nn.Module:
    """The loss as main_mlc.py builds it."""
    return code.loss_class(
        gamma_neg=args.gamma_neg,
        gamma_pos=args.gamma_pos,
        clip=args.loss_clip,
        disable_torch_grad_focal_loss=args.dtgfl,
        eps=args.eps,
    )


# ---- shims ---------------------------------------------------------------------------------------


class _WithoutDownload:
    """Stands in for `torchvision.models` inside the official backbone: `pretrained=True` (a
    download from the internet) becomes `weights=None`."""

    def __getattr__(self, name: str):
        build = getattr(torchvision.models, name)

        def without_download(*args, pretrained: bool = False, **kwargs):
            return build(*args, weights=None, **kwargs)

        return without_download


@contextlib.contextmanager
def _packages(folders: dict[str, Path]) -> Iterator[dict[str, types.ModuleType]]:
    """Bare packages named after `folders` (their __init__.py not run) in sys.modules while the
    block runs; afterwards sys.modules is as it was, and the imported modules live on through the
    references the caller took."""
    saved = {name: module for name, module in sys.modules.items() if _under(name, folders)}
    for name in saved:
        del sys.modules[name]
    for name, folder in folders.items():
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    try:
        yield sys.modules
    finally:
        for name in [name for name in sys.modules if _under(name, folders)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _under(name: str, packages: dict[str, Path]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def _stub(name: str, *attributes: str) -> types.ModuleType:
    """A module whose `attributes` raise when used: the parts the comparison never reaches."""
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{name} is not loaded by the q2l benchmark's shims")

    for attribute in attributes:
        setattr(module, attribute, unavailable)
    return module


def _model_ema_class(main_file: Path) -> type:
    """`ModelEma` from main_mlc.py, compiled from that class's source alone."""
    tree = ast.parse(main_file.read_text(), filename=str(main_file))
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelEma"]
    if not found:
        raise ValueError(f"{main_file} defines no ModelEma class")
    namespace = {"torch": torch, "deepcopy": copy.deepcopy}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(main_file), "exec"), namespace)
    return namespace["ModelEma"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield

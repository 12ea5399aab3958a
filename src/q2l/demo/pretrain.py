"""Single-label backbone pretraining: the demo's stand-in for ImageNet weights.

Query2Label is always trained from a pretrained backbone; from a random start its transformer
head stalls (measured on the digits demo: every head variant stayed at ~32 mAP for 4 epochs, while
the same head on a briefly pretrained backbone reached 86 in 2). Nothing may be downloaded here, so
the demo pretrains its backbone itself, the way ImageNet weights are made: a timm model with a
linear classifier learns to name ONE digit per image (softmax cross-entropy), on small images
built only from the training split's scans. The weights are saved as a local .safetensors file
and loaded through `backbone.weights`, the same path users take with real pretrained weights.

The weights go into a folder of their own (`output_dir/weights.safetensors`), created and marked by
`q2l.demo.owned`: a matching marker skips the work, and a folder q2l did not create, or a user's
weights file, is never written to.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from q2l.demo.digits import split_digit_scans
from q2l.demo.owned import build_owned_folder, data_dir_hint
from q2l.models.backbone import normalization
from q2l.utils.amp import autocast, resolve_precision
from q2l.utils.atomic import give_default_mode
from q2l.utils.progress import track
from q2l.utils.threads import rebalance_threads

log = logging.getLogger(__name__)


WEIGHTS_FILE = "weights.safetensors"


def pretrain_digits_backbone(
    output_dir: str | Path,
    name: str = "resnet10t",
    num_images: int = 3000,
    image_size: int = 32,
    digit_size: int = 24,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> Path:
    """Train timm `name` to classify single digits; save the backbone in `output_dir`.

    Images are rendered in memory from the training scan pool only (never the demo's val scans):
    one digit of about `digit_size` px, random bright colour on a random dark background with noise,
    jittered inside an `image_size` canvas, which is the look of the demo canvases. Returns the
    weights file, `output_dir/weights.safetensors`; skips all work when `output_dir` already holds
    them for these arguments.
    """
    arguments = {
        "name": name,
        "num_images": num_images,
        "image_size": image_size,
        "digit_size": digit_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        # bf16 where this CPU has bf16 units (q2l.utils.amp), as the demo's training itself.
        "precision": resolve_precision("auto", torch.device("cpu")),
        "version": 3,
    }

    def build(folder: Path) -> None:
        _pretrain(folder / WEIGHTS_FILE, **arguments)

    folder = build_owned_folder(
        output_dir,
        "the digits-pretrained demo backbone",
        arguments,
        build,
        hint=data_dir_hint("prepare.backbone.output_dir"),
    )
    return folder / WEIGHTS_FILE


def _pretrain(
    output: Path,
    name: str,
    num_images: int,
    image_size: int,
    digit_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    precision: str,
    version: int,
) -> None:
    """The training itself: writes the backbone's state dict (classifier removed) to `output`."""
    start = time.perf_counter()
    log.info(
        "pretraining the demo's %s backbone on %d single digits for %d epochs (once: it is "
        "cached for later runs)",
        name,
        num_images,
        epochs,
    )
    generator = torch.Generator().manual_seed(seed)
    images, labels = _render_single_digits(num_images, image_size, digit_size, seed, generator)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(name))
    images = (images - mean) / std

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps_per_epoch = num_images // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    correct = 0
    for epoch in range(epochs):
        order = torch.randperm(num_images, generator=generator)
        where = f"pretrain epoch {epoch + 1}/{epochs}"
        steps = track(range(steps_per_epoch), steps_per_epoch, where)
        for step in steps:
            batch = order[step * batch_size : (step + 1) * batch_size]
            with autocast(torch.device("cpu"), precision):
                logits = model(images[batch])
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            rebalance_threads()
            if epoch == epochs - 1:
                correct += int((logits.argmax(1) == labels[batch]).sum())
        log.info("%s done (%.0f s so far)", where, time.perf_counter() - start)
    torch.random.set_rng_state(rng_state)  # leave the caller's random stream as it was
    model.reset_classifier(0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output))
    give_default_mode(output)  # save_file creates the file 0600
    log.info(
        # No path here: `output` is still the temporary folder build_owned_folder renames.
        "pretrained %s on single digits: %.1f%% train accuracy in the last epoch, %.0f s",
        name,
        100 * correct / (steps_per_epoch * batch_size),
        time.perf_counter() - start,
    )


def _render_single_digits(
    num_images: int, image_size: int, digit_size: int, seed: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_images, 3, S, S) float images in [0, 1] and (num_images,) digit labels."""
    from sklearn.datasets import load_digits

    train_pool, _ = split_digit_scans(seed)
    scans = load_digits()
    pick = torch.from_numpy(train_pool)[
        torch.randint(len(train_pool), (num_images,), generator=generator)
    ]
    ink = torch.from_numpy(scans.images[pick.numpy()]).float().unsqueeze(1) / 16  # (N, 1, 8, 8)
    ink = F.interpolate(
        ink, size=(digit_size, digit_size), mode="bicubic", align_corners=False
    ).clamp(0, 1)
    alpha = torch.zeros(num_images, 1, image_size, image_size)
    offsets = torch.randint(image_size - digit_size + 1, (num_images, 2), generator=generator)
    for index, (top, left) in enumerate(offsets.tolist()):
        alpha[index, :, top : top + digit_size, left : left + digit_size] = ink[index]
    foreground = 0.5 + 0.5 * torch.rand(num_images, 3, 1, 1, generator=generator)
    background = 0.35 * torch.rand(num_images, 3, 1, 1, generator=generator)
    noise = 0.025 * torch.randn(num_images, 3, image_size, image_size, generator=generator)
    images = (background + (foreground - background) * alpha + noise).clamp(0, 1)
    return images, torch.from_numpy(scans.target[pick.numpy()]).long()

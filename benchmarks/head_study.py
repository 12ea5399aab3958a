"""Learning study: does Query2Label beat global pooling where objects are small and cluttered?

    python -m benchmarks.head_study --out study/                  # CPU size: ~2 h on one core
    python -m benchmarks.head_study --out study-gpu/ --size gpu   # the same study, larger

One command renders the data (q2l.demo.scenes: 1-4 digits of 14-28 px among unlabelled
distractors on 160 px canvases, so each digit covers about one cell of a stride-32 backbone's
5x5 map), pretrains a backbone on single-object crops of the same family (no ImageNet weights are
at hand offline; this stands in for them, as the demo's digit pretraining does), then trains every
arm from those weights for every seed and writes:

    results.jsonl   one line per (arm, seed): val mAP after every epoch, wall time, settings
    table.md        final val mAP per arm: mean, standard deviation and range over seeds, and the
                    difference to global pooling paired by seed
    study.png       the same as a chart: every seed's final mAP, means, and learning curves

Arms are config overrides of `python train.py` (the heads exactly as `model=` builds them), plus
study-only knobs (backbone learning-rate scale, epochs). Seeds vary the head's initialisation and
the batch order; data and pretrained backbone are shared by all runs. Finished (arm, seed) runs
are read back from results.jsonl, so an interrupted study resumes, and more seeds or arms can be
added to the same folder. Every run uses `--threads` intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from benchmarks.study_plot import draw_study
from q2l.config import CONFIG_DIR
from q2l.demo.scenes import NUM_CLASSES, render_crops, render_scenes
from q2l.metrics import mean_average_precision
from q2l.models.backbone import normalization
from q2l.optim import build_onecycle, no_weight_decay_names
from q2l.training.build import build_model
from q2l.utils.amp import autocast, resolve_precision

log = logging.getLogger("head_study")


@dataclass(frozen=True)
class Arm:
    """One setting of the study: config overrides plus study-only knobs."""

    title: str
    overrides: tuple[str, ...]
    backbone_lr_scale: float = 1.0  # backbone learning rate = lr x this
    epochs_scale: float = 1.0  # epochs = the study's epochs x this


# The comparison the study exists for, then ablations (run with --arms NAME ...).
ARMS: dict[str, Arm] = {
    "baseline": Arm("global pooling + linear (model=baseline)", ("model=baseline",)),
    "q2l": Arm(
        "Query2Label, q2l layout (model=q2l_small: pre-norm, dropout 0)", ("model=q2l_small",)
    ),
    "official": Arm(
        "Query2Label, official layout (model=q2l_small model.norm=post model.dropout=0.1)",
        ("model=q2l_small", "model.norm=post", "model.dropout=0.1"),
    ),
    "ml_decoder": Arm("ML-Decoder (model=ml_decoder)", ("model=ml_decoder",)),
    # Ablations of the q2l layout.
    "q2l_no_encoder": Arm(
        "Query2Label, q2l layout, no encoder layer",
        ("model=q2l_small", "model.num_encoder_layers=0"),
    ),
    "q2l_backbone_lr_0.1": Arm(
        "Query2Label, q2l layout, backbone lr x0.1", ("model=q2l_small",), backbone_lr_scale=0.1
    ),
    "baseline_backbone_lr_0.1": Arm(
        "global pooling + linear, backbone lr x0.1", ("model=baseline",), backbone_lr_scale=0.1
    ),
    "q2l_wide": Arm(
        "Query2Label, q2l layout, paper width (model=q2l: D 2048, FFN 8192)", ("model=q2l",)
    ),
    "q2l_x2_epochs": Arm(
        "Query2Label, q2l layout, twice the epochs", ("model=q2l_small",), epochs_scale=2.0
    ),
    "baseline_x2_epochs": Arm(
        "global pooling + linear, twice the epochs", ("model=baseline",), epochs_scale=2.0
    ),
    "official_x2_epochs": Arm(
        "Query2Label, official layout, twice the epochs",
        ("model=q2l_small", "model.norm=post", "model.dropout=0.1"),
        epochs_scale=2.0,
    ),
}
MAIN_ARMS = ("baseline", "q2l", "official", "ml_decoder")


@dataclass(frozen=True)
class StudySize:
    """How big the study is: images, resolution, training length, seeds."""

    image_size: int = 160
    num_train: int = 3000
    num_val: int = 1000
    epochs: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 32
    lr: float = 1e-3
    backbone: str = "resnet18"
    pretrain_images: int = 12000
    pretrain_epochs: int = 6
    pretrain_size: int = 32
    pretrain_lr: float = 2e-3


SIZES = {
    "cpu": StudySize(),
    # A GPU runs the same study on larger canvases (7x7 cells), 6x the data, longer, more seeds.
    "gpu": StudySize(
        image_size=224,
        num_train=20000,
        num_val=4000,
        epochs=12,
        seeds=(0, 1, 2, 3, 4),
        batch_size=64,
        pretrain_images=50000,
        pretrain_epochs=8,
    ),
}


@dataclass
class RunResult:
    """One (arm, seed) run."""

    arm: str
    seed: int
    val_map_per_epoch: list[float]
    seconds: float  # wall time of training and evaluation
    threads: int
    device: str
    precision: str
    settings: dict = field(default_factory=dict)
    cpu_seconds: float | None = None  # this process's CPU time for the run (None: not recorded)

    @property
    def final_map(self) -> float:
        return self.val_map_per_epoch[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    size = SIZES[args.size]
    overrides = {
        k: getattr(args, k) for k in ("image_size", "num_train", "epochs") if getattr(args, k)
    }
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    size = StudySize(**{**asdict(size), **overrides})
    torch.set_num_threads(args.threads)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(out, size)
    weights = pretrain_backbone(out, size, device)
    results = read_results(out / "results.jsonl")
    for arm_name in args.arms:
        for seed in size.seeds:
            key = (arm_name, seed, _size_key(size))
            if key in results:
                continue
            result = run_arm(
                arm_name, ARMS[arm_name], seed, size, data, weights, device, args.threads
            )
            results[key] = result
            with (out / "results.jsonl").open("a") as handle:
                handle.write(json.dumps({**asdict(result), "size_key": _size_key(size)}) + "\n")
    chosen = {name: [results[(name, s, _size_key(size))] for s in size.seeds] for name in args.arms}
    table = format_table(chosen, size)
    (out / "table.md").write_text(table)
    draw_study(
        {ARMS[name].title: [r.val_map_per_epoch for r in runs] for name, runs in chosen.items()},
        out / "study.png",
        subtitle=f"{size.image_size} px scenes, {size.num_train} train / {size.num_val} val, "
        f"{size.backbone} pretrained on crops, seeds {list(size.seeds)}",
    )
    print(table)
    print(
        f"wrote {out / 'table.md'} and {out / 'study.png'} ({time.perf_counter() - started:.0f} s)"
    )
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.head_study", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", required=True, help="folder for data, weights, results, table, plot"
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(MAIN_ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, help="override the size's seeds")
    parser.add_argument("--epochs", type=int, help="override the size's epochs")
    parser.add_argument("--image-size", type=int, help="override the size's canvas side (px)")
    parser.add_argument("--num-train", type=int, help="override the size's training scenes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    return parser.parse_args(argv)


def _size_key(size: StudySize) -> str:
    """What makes runs comparable: everything in the size but the seeds."""
    fields = {k: v for k, v in asdict(size).items() if k != "seeds"}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# ---- data and pretraining ------------------------------------------------------------------------


def prepare_data(out: Path, size: StudySize) -> dict[str, torch.Tensor]:
    """Train and val scenes (uint8 images, float targets), rendered once and cached in `out`."""
    path = out / f"scenes-{size.image_size}-{size.num_train}-{size.num_val}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    train_x, train_y = render_scenes(size.num_train, "train", size.image_size, seed=0)
    val_x, val_y = render_scenes(size.num_val, "val", size.image_size, seed=0)
    data = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}
    torch.save(data, path)
    log.info(
        "rendered %d + %d scenes in %.0f s",
        size.num_train,
        size.num_val,
        time.perf_counter() - start,
    )
    return data


def pretrain_backbone(out: Path, size: StudySize, device: torch.device) -> Path:
    """A `size.backbone` trained to name the digit of single-object crops (or "no digit"),
    saved without its classifier in `out`; skipped when the file exists. Its accuracy on 1000
    held-out crops is logged."""
    path = out / (
        f"pretrained-{size.backbone}-{size.pretrain_size}px-{size.pretrain_images}x"
        f"{size.pretrain_epochs}-lr{size.pretrain_lr:g}.safetensors"
    )
    if path.is_file():
        return path
    start = time.perf_counter()
    count = size.pretrain_images
    images, labels = render_crops(count + 1000, size.pretrain_size, distractors=(0, 1), seed=0)
    torch.manual_seed(0)
    model = timm.create_model(size.backbone, pretrained=False, num_classes=NUM_CLASSES + 1).to(
        device
    )
    precision = resolve_precision("auto", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=1e-2)
    steps = count // size.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, size.pretrain_lr, total_steps=size.pretrain_epochs * steps
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(size.pretrain_epochs):
        model.train()
        order = torch.randperm(count, generator=generator)
        for step in range(steps):
            batch = order[step * size.batch_size : (step + 1) * size.batch_size]
            inputs = _normalise(images[batch], size.backbone).to(device)
            with autocast(device, precision):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        held_out = model(_normalise(images[count:], size.backbone).to(device)).argmax(1).cpu()
    accuracy = float((held_out == labels[count:]).float().mean())
    model.reset_classifier(0)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    log.info(
        "pretrained %s on %d crops x %d epochs: %.1f%% accuracy on 1000 held-out crops, %.0f s",
        size.backbone,
        count,
        size.pretrain_epochs,
        100 * accuracy,
        time.perf_counter() - start,
    )
    (out / "pretraining.json").write_text(
        json.dumps({"file": path.name, "held_out_accuracy": accuracy, **asdict(size)}, indent=1)
    )
    return path


def _normalise(images: torch.Tensor, backbone: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as the backbone's weights expect."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(backbone))
    return (images.float() / 255 - mean) / std


# ---- one run -------------------------------------------------------------------------------------


def run_arm(
    name: str,
    arm: Arm,
    seed: int,
    size: StudySize,
    data: dict[str, torch.Tensor],
    weights: Path,
    device: torch.device,
    threads: int,
) -> RunResult:
    """Train `arm` from the pretrained backbone with `seed`; val mAP after every epoch."""
    cfg = compose_config(
        [
            "dataset=digits",
            "dataset.root=unused",  # the config's data set is not read: the scenes are in memory
            f"dataset.image_size={size.image_size}",
            f"backbone={size.backbone}",
            f"backbone.weights={weights}",
            "backbone.pretrained=true",
            *arm.overrides,
        ]
    )
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(seed)
    model = build_model(config, NUM_CLASSES).to(device)
    loss_fn = instantiate(cfg.loss).to(device)
    precision = resolve_precision("auto", device)
    epochs = max(1, round(size.epochs * arm.epochs_scale))
    steps = size.num_train // size.batch_size
    optimizer = _optimizer(model, size.lr, arm.backbone_lr_scale, cfg.optimizer.weight_decay)
    schedule = build_onecycle(optimizer, total_steps=epochs * steps, steps_per_epoch=steps)
    generator = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    per_epoch = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(size.num_train, generator=generator)
        for step in range(steps):
            batch = order[step * size.batch_size : (step + 1) * size.batch_size]
            inputs = _normalise(data["train_x"][batch], size.backbone).to(device)
            with autocast(device, precision):
                logits = model(inputs)
            loss = loss_fn(logits.float(), data["train_y"][batch].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name} seed {seed}: loss {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        per_epoch.append(evaluate(model, data, size, device, precision))
        log.info(
            "%s seed %d epoch %d: val mAP %.2f (%.0f s)",
            name,
            seed,
            epoch + 1,
            per_epoch[-1],
            time.perf_counter() - start,
        )
    return RunResult(
        arm=name,
        seed=seed,
        val_map_per_epoch=per_epoch,
        seconds=round(time.perf_counter() - start, 1),
        threads=threads,
        device=str(device),
        precision=precision,
        settings={"overrides": list(arm.overrides), "epochs": epochs, **asdict(size)},
        cpu_seconds=round(time.process_time() - cpu_start, 1),
    )


def compose_config(overrides: list[str]) -> DictConfig:
    """The training config with `overrides`, composed as train.py composes it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _optimizer(
    model: nn.Module, lr: float, backbone_lr_scale: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW as `optimizer=adamw` builds it (no decay on 1-D parameters and declared ones), with
    the backbone's learning rate scaled by `backbone_lr_scale`."""
    undecayed = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for parameter_name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_backbone = parameter_name.startswith("backbone.")
        decayed = parameter.ndim > 1 and parameter_name not in undecayed
        groups.setdefault((in_backbone, decayed), []).append(parameter)
    return torch.optim.AdamW(
        [
            {
                "params": parameters,
                "lr": lr * (backbone_lr_scale if in_backbone else 1.0),
                "weight_decay": weight_decay if decayed else 0.0,
            }
            for (in_backbone, decayed), parameters in groups.items()
        ]
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    size: StudySize,
    device: torch.device,
    precision: str,
) -> float:
    """Val mAP (non-interpolated, percent)."""
    model.eval()
    scores = []
    for begin in range(0, size.num_val, 100):
        inputs = _normalise(data["val_x"][begin : begin + 100], size.backbone).to(device)
        with autocast(device, precision):
            scores.append(torch.sigmoid(model(inputs).float()).cpu())
    return 100 * mean_average_precision(torch.cat(scores), data["val_y"])[0]


# ---- results -------------------------------------------------------------------------------------


def read_results(path: Path) -> dict[tuple[str, int, str], RunResult]:
    """Finished runs from results.jsonl, keyed by (arm, seed, size key)."""
    if not path.is_file():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = (record["arm"], record["seed"], record.pop("size_key"))
        results[key] = RunResult(**record)
    return results


def _time(runs: list[RunResult]) -> str:
    wall = f"{statistics.mean(r.seconds for r in runs):.0f} s"
    cpu = [r.cpu_seconds for r in runs if r.cpu_seconds is not None]
    return f"{wall} ({statistics.mean(cpu):.0f} s CPU)" if cpu else wall


def format_table(chosen: dict[str, list[RunResult]], size: StudySize) -> str:
    """Markdown: final val mAP per arm over seeds, and the paired difference to global pooling."""
    baseline = {r.seed: r.final_map for r in chosen.get("baseline", [])}
    lines = [
        f"Final val mAP after {size.epochs} epochs (x the arm's scale), {size.image_size} px, "
        f"seeds {list(size.seeds)}; spread = sample standard deviation over seeds; time = wall "
        "seconds per run (CPU seconds where recorded).",
        "",
        "| arm | mean | spread (sd) | range | vs global pooling, paired by seed (mean, range) "
        "| time per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in chosen.items():
        finals = [r.final_map for r in runs]
        spread = statistics.stdev(finals) if len(finals) > 1 else math.nan
        if name != "baseline" and baseline:
            deltas = [r.final_map - baseline[r.seed] for r in runs if r.seed in baseline]
            versus = f"{statistics.mean(deltas):+.2f} ({min(deltas):+.2f} to {max(deltas):+.2f})"
        else:
            versus = "-"
        lines.append(
            f"| {ARMS[name].title} | {statistics.mean(finals):.2f} | {spread:.2f} | "
            f"{min(finals):.2f}-{max(finals):.2f} | {versus} | "
            f"{_time(runs)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

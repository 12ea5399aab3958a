"""Inference benchmarks (issue #12): ONNX Runtime against PyTorch on CPU, `q2l-predict` end to
end, and the forward pass with and without the attention-map hook.

    python -m benchmarks.inference                  # demo-sized model; add --cases demo,paper
    python -m benchmarks.inference --quick

`measure_inference(cases, rounds)` returns the rows, for `benchmarks/cli.py` to run as a section
(not wired in yet), e.g. `rows += section("inference", inference.measure_inference, ["demo"],
rounds) or []`. Like the other sections, every row compares two workloads measured in the same
interleaved rounds (`benchmarks.timing.compare`: median rates, median and spread of the per-round
ratios), with random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import Rates, Row, Workload, compare, interleaved
from q2l.inference.exporters import export_onnx, export_safetensors
from q2l.inference.model_info import ModelInfo
from q2l.models import Query2Label, TimmBackbone
from q2l.models.attention_maps import CrossAttentionMaps
from q2l.models.backbone import normalization

log = logging.getLogger("q2l.bench")


@dataclass(frozen=True)
class InferenceCase:
    key: str
    backbone: str
    image_size: int
    hidden_dim: int
    ffn_dim: int
    num_classes: int
    batch_size: int


CASES = {
    "demo": InferenceCase("demo", "resnet10t", 64, 256, 1024, 10, 32),
    "paper": InferenceCase("paper", "resnet50", 224, 2048, 8192, 80, 8),
}


def build(case: InferenceCase, seed: int = 0) -> tuple[torch.nn.Module, ModelInfo]:
    """The case's model (random weights, eval mode) and the record its exports carry."""
    torch.manual_seed(seed)
    backbone = TimmBackbone(case.backbone, pretrained=False)
    model = Query2Label(
        backbone, case.num_classes, hidden_dim=case.hidden_dim, ffn_dim=case.ffn_dim
    ).eval()
    mean, std = normalization(case.backbone)
    head = {
        "_target_": "q2l.models.query2label.Query2Label",
        "hidden_dim": case.hidden_dim,
        "ffn_dim": case.ffn_dim,
    }
    info = ModelInfo(
        class_names=[f"class{k}" for k in range(case.num_classes)],
        image_size=case.image_size,
        mean=list(mean),
        std=list(std),
        threshold=0.5,
        model_config={
            "backbone": {"name": case.backbone, "pretrained": False},
            "model": head,
            "dataset": {"image_size": case.image_size},
        },
    )
    return model, info


def measure_inference(cases: list[str], rounds: int, predict_images: int = 96) -> list[Row]:
    """Every inference row for each case key in `cases`."""
    rows: list[Row] = []
    for key in cases:
        case = CASES[key]
        model, info = build(case)
        rows += measure_attention_hook(case, model, rounds)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            onnx_path, weights_path = folder / "model.onnx", folder / "model.safetensors"
            checked = export_onnx(model, info, onnx_path, tolerance=1e-4)
            export_safetensors(model, info, weights_path, tolerance=1e-4)
            log.info(
                "%s: ONNX export max |score difference| %.2e, |logit difference| %.2e",
                key,
                checked["max_abs_score_difference"],
                checked["max_abs_logit_difference"],
            )
            rows += measure_onnx_runtime(case, model, onnx_path, rounds, checked)
            rows += measure_predict(
                case, onnx_path, weights_path, folder, predict_images, max(rounds // 2, 1)
            )
    return rows


def measure_attention_hook(case: InferenceCase, model: torch.nn.Module, rounds: int) -> list[Row]:
    """Forward pass images/s inside CrossAttentionMaps against the plain forward pass."""
    images = torch.randn(case.batch_size, 3, case.image_size, case.image_size)

    def plain() -> int:
        with torch.inference_mode():
            model(images)
        return case.batch_size

    def hooked() -> int:
        with CrossAttentionMaps(model), torch.inference_mode():
            model(images)
        return case.batch_size

    rates = interleaved({"plain": Workload(plain), "hooked": Workload(hooked)}, rounds)
    return [
        compare(
            "inference",
            f"{case.key}: forward with attention-map hook",
            rates["hooked"],
            rates["plain"],
            "img/s",
            "forward without hook",
            note=f"hooked {_spread(rates['hooked'])}, plain {_spread(rates['plain'])}",
        )
    ]


def measure_onnx_runtime(
    case: InferenceCase, model: torch.nn.Module, onnx_path: Path, rounds: int, checked: dict
) -> list[Row]:
    """ONNX Runtime (CPU, fp32) images/s against eager PyTorch fp32 on the same batch."""
    from q2l.inference.runtime import OnnxScorer

    session = OnnxScorer(onnx_path).session  # as q2l-predict runs it (no thread spinning)
    images = torch.randn(case.batch_size, 3, case.image_size, case.image_size)
    feed = {"images": images.numpy()}

    def runtime() -> int:
        session.run(None, feed)
        return case.batch_size

    def eager() -> int:
        with torch.inference_mode():
            model(images)
        return case.batch_size

    rates = interleaved({"onnx": Workload(runtime), "torch": Workload(eager)}, rounds)
    return [
        compare(
            "inference",
            f"{case.key}: ONNX Runtime CPU fp32",
            rates["onnx"],
            rates["torch"],
            "img/s",
            "PyTorch eager fp32",
            note=f"max |score diff| {checked['max_abs_score_difference']:.1e}; onnx "
            f"{_spread(rates['onnx'])}, torch {_spread(rates['torch'])}",
        )
    ]


def measure_predict(
    case: InferenceCase,
    onnx_path: Path,
    weights_path: Path,
    folder: Path,
    num_images: int,
    rounds: int,
) -> list[Row]:
    """`q2l-predict` end to end (decode, resize, batch, score, write) on a folder of JPEGs at
    twice the model's size: images/s from the ONNX export against the PyTorch (safetensors) one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from q2l.config import CONFIG_DIR
    from q2l.inference.predict import predict

    photos = folder / "photos"
    photos.mkdir()
    generator = np.random.default_rng(0)
    side = 2 * case.image_size
    for index in range(num_images):
        pixels = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{index:05d}.jpg", quality=90)
    counter = iter(range(10**6))

    def run(model_file: Path) -> Callable[[], int]:
        def once() -> int:
            output = folder / f"predictions-{next(counter)}.jsonl"
            overrides = [
                f"model_file={model_file}",
                f"input={photos}",
                f"output={output}",
                f"batch_size={case.batch_size}",
                "progress_bar=false",
                "device=cpu",
                "precision=fp32",
            ]
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose("predict", overrides)
            GlobalHydra.instance().clear()
            return predict(cfg)["num_scored"]

        return once

    rates = interleaved(
        {"onnx": Workload(run(onnx_path)), "torch": Workload(run(weights_path))}, rounds
    )
    return [
        compare(
            "inference",
            f"{case.key}: q2l-predict end to end, ONNX Runtime",
            rates["onnx"],
            rates["torch"],
            "img/s",
            "q2l-predict, PyTorch fp32",
            note=f"{num_images} JPEGs of {side} px, num_workers 2; onnx {_spread(rates['onnx'])}, "
            f"torch {_spread(rates['torch'])}",
        )
    ]


def _spread(rates: Rates) -> str:
    """'median (min-max)' of a workload's per-round rates."""
    samples = rates.samples
    return f"{statistics.median(samples):.4g} ({min(samples):.4g}-{max(samples):.4g})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", default="demo", help="comma-separated: demo, paper")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in (
        "q2l.inference.predict",
        "q2l.inference",
        "q2l.utils.progress",
        "q2l.inference.export",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    rounds = args.rounds or (3 if args.quick else 7)
    rows = measure_inference(args.cases.split(","), rounds, 48 if args.quick else 96)
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio else "-"
        spread = f" ({row.ratio_low:.2f}-{row.ratio_high:.2f})" if row.round_ratios else ""
        print(
            f"{row.name}: {row.value:.4g} vs {row.baseline:.4g} {row.unit} ({row.baseline_name}),"
            f" median {row.unit} per round; ratio {ratio}{spread}; {row.note}"
        )


if __name__ == "__main__":
    main()

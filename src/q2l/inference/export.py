"""Export entry point: a checkpoint as ONNX, TorchScript or weights-only safetensors.

    q2l-export ckpt=outputs/.../checkpoints/best.pt format=onnx [output=model.onnx]

Each export is checked against the PyTorch model right after it is written (max |difference| of
scores, logged; above `tolerance` nothing is kept) and carries the model record `q2l-predict`
needs: classes, image size, mean/std, the run's threshold, calibrated thresholds if the checkpoint
has them, and the model config (q2l.inference.model_info). An existing output is never replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from q2l.config.checks import choice
from q2l.inference import exporters
from q2l.inference.model_info import ModelInfo, read_thresholds, thresholds_path
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.utils.errors import ConfigError

log = logging.getLogger("q2l.inference.export")

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export `cfg.ckpt` as `cfg.format` into `cfg.output`; returns what was written and checked."""
    fmt = choice(cfg.format)
    output = _output_path(cfg, fmt)
    checkpoint_path = Path(cfg.ckpt)
    checkpoint = load_checkpoint(checkpoint_path)
    model, weights = model_from_checkpoint(checkpoint, cfg.weights)
    info = ModelInfo.from_checkpoint(checkpoint, weights).with_thresholds(
        _thresholds_record(cfg.thresholds, checkpoint_path)
    )
    log.info(
        "exporting %s (%s weights, %d classes, %d px) as %s -> %s",
        checkpoint_path,
        weights,
        len(info.class_names),
        info.image_size,
        fmt,
        output,
    )
    writer = {
        "onnx": lambda: exporters.export_onnx(
            model.float(), info, output, cfg.tolerance, cfg.opset
        ),
        "torchscript": lambda: exporters.export_torchscript(
            model.float(), info, output, cfg.tolerance
        ),
        "safetensors": lambda: exporters.export_safetensors(
            model.float(), info, output, cfg.tolerance
        ),
    }[fmt]
    differences = writer()
    size, checkpoint_size = exporters.exported_size(output), checkpoint_path.stat().st_size
    log.info(
        "wrote %s (%.1f MB, %.0f%% of the checkpoint's %.1f MB); check against PyTorch: max "
        "|score difference| %.2e, max |logit difference| %.2e; thresholds: %s",
        output,
        size / 1e6,
        100 * size / checkpoint_size,
        checkpoint_size / 1e6,
        differences["max_abs_score_difference"],
        differences["max_abs_logit_difference"],
        "per-class (calibrated)" if info.thresholds else f"the run's {info.threshold}",
    )
    return {
        "output": str(output),
        "bytes": size,
        "checkpoint_bytes": checkpoint_size,
        **differences,
    }


def _output_path(cfg: DictConfig, fmt: str) -> Path:
    """The output file, refused before any work when it exists or its suffix is wrong."""
    if cfg.output:
        output = Path(cfg.output).expanduser()
        if not output.name.endswith(SUFFIXES[fmt].rsplit(".", 1)[-1]):
            raise ConfigError(f"output={cfg.output}: a {fmt} export's name ends in {SUFFIXES[fmt]}")
    else:
        checkpoint = Path(cfg.ckpt)
        output = checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])
    if output.exists():
        raise FileExistsError(f"output={output} exists; q2l does not overwrite it. Pass output=...")
    return output


def _thresholds_record(option: str, checkpoint: Path) -> dict[str, Any] | None:
    """The thresholds file to embed: auto (beside the checkpoint, if any), none, or a path."""
    if option == "none":
        return None
    if option == "auto":
        beside = thresholds_path(checkpoint)
        return read_thresholds(beside) if beside.is_file() else None
    return read_thresholds(option)

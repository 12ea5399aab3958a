"""Export formats: ONNX, TorchScript and weights-only safetensors, each carrying a `ModelInfo`.

The graphs map preprocessed images (B, 3, S, S) float32 to logits (B, K); resizing and
normalisation stay outside (the record describes them), so the same decoded image feeds every
format, and the graph holds no PIL- or torchvision-specific operation. S is fixed at the record's
image_size; the batch axis is dynamic.

Every format is written to a temporary file beside the target, checked against the PyTorch
module on the same random images (a batch size other than the traced one, so the dynamic axis is
exercised), and only then linked to its name, which must not exist: a failed check leaves nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from q2l.inference.model_info import ModelInfo
from q2l.utils.atomic import give_default_mode, link_new
from q2l.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# The model is exported as the 2-GB protobuf limit allows in one file; larger ones need
# external data, which this exporter does not write.
_ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**26


class ExportCheckError(UserError, RuntimeError):
    """An exported model whose scores differ from PyTorch's by more than the tolerance."""


def export_onnx(
    model: nn.Module, info: ModelInfo, output: Path, tolerance: float, opset: int | None = None
) -> dict[str, float]:
    """Write `model` as ONNX (torch.onnx.export, dynamo exporter) with `info` in
    metadata_props["q2l"]; returns the check's max differences."""
    from q2l.inference.runtime import OnnxScorer, import_onnxruntime

    import_onnxruntime()  # fail before the slow export when the check cannot run
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    if size > _ONNX_SINGLE_FILE_LIMIT:
        raise ConfigError(
            f"the model's weights take {size / 2**30:.1f} GiB, more than one ONNX "
            "file holds; export format=safetensors instead"
        )
    example = _images(info, 2)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[info.input_name],
            output_names=[info.output_name],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            verbose=False,
        )
    program.model.metadata_props["q2l"] = info.to_json()

    def write(path: Path) -> None:
        program.save(str(path), external_data=False)

    def score(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        session = OnnxScorer(path).session  # also proves the record reads back
        feed = info.input_name
        return lambda images: torch.from_numpy(session.run(None, {feed: images.numpy()})[0])

    return _write_checked(model, info, output, write, score, tolerance)


def export_torchscript(
    model: nn.Module, info: ModelInfo, output: Path, tolerance: float
) -> dict[str, float]:
    """Write `model` traced with torch.jit.trace, `info` as the archive's extra file q2l.json;
    returns the check's max differences."""
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(model, _images(info, 2))

    def write(path: Path) -> None:
        with _quiet_exporter():
            torch.jit.save(traced, str(path), _extra_files={"q2l.json": info.to_json()})

    def score(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        with _quiet_exporter():
            loaded = torch.jit.load(str(path), map_location="cpu")
        return lambda images: loaded(images)

    return _write_checked(model, info, output, write, score, tolerance)


def export_safetensors(
    model: nn.Module, info: ModelInfo, output: Path, tolerance: float
) -> dict[str, float]:
    """Write the weights alone (safetensors) and `info` as `<output stem>.json` beside them;
    returns the check's max differences (of the module rebuilt from the two files)."""
    from safetensors.torch import save_file

    from q2l.inference.runtime import load_safetensors_export

    sidecar = output.with_suffix(".json")
    if sidecar.exists():
        raise FileExistsError(f"{sidecar} exists; q2l does not overwrite it. Pass another output")

    def write(path: Path) -> None:
        # Tensors that share memory (none in Query2Label today) would need one copy each.
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt"})
        give_default_mode(path)  # save_file creates the file 0600

    def score(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        # The rebuilt module reads the record beside the final name; check with a temporary one.
        temporary_sidecar = path.with_suffix(".json")
        temporary_sidecar.write_text(info.to_json())
        try:
            rebuilt, _ = load_safetensors_export(path)
        finally:
            temporary_sidecar.unlink()
        return lambda images: rebuilt(images)

    differences = _write_checked(model, info, output, write, score, tolerance)
    link_new(
        _write_text_temporary(sidecar, info.to_json()),
        sidecar,
        f"{sidecar} appeared during the export; it was left as it was",
    )
    return differences


def _write_checked(
    model: nn.Module,
    info: ModelInfo,
    output: Path,
    write: Callable[[Path], None],
    score: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]],
    tolerance: float,
) -> dict[str, float]:
    """write(temporary) -> compare score(temporary) with `model` -> link to `output`."""
    if output.exists():
        raise FileExistsError(f"output={output} exists; q2l does not overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    try:
        write(temporary)
        differences = _compare(model, score(temporary), info)
        if differences["max_abs_score_difference"] > tolerance:
            raise ExportCheckError(
                f"the exported model's scores differ from PyTorch's by up to "
                f"{differences['max_abs_score_difference']:.3g} (> tolerance {tolerance}); "
                f"nothing was written to {output}"
            )
        link_new(temporary, output, f"{output} appeared during the export; it was left as it was")
    finally:
        temporary.unlink(missing_ok=True)
    return differences


@torch.no_grad()
def _compare(
    model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], info: ModelInfo
) -> dict[str, float]:
    """Max |difference| of logits and of sigmoid scores on 3 seeded random images."""
    images = _images(info, 3, seed=1)
    expected = model(images).float()
    found = exported(images).float()
    return {
        "max_abs_logit_difference": float((found - expected).abs().max()),
        "max_abs_score_difference": float((found.sigmoid() - expected.sigmoid()).abs().max()),
    }


def _images(info: ModelInfo, batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, S, S) normalised-looking random images, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, info.image_size, info.image_size, generator=generator)


def _write_text_temporary(target: Path, text: str) -> Path:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    return temporary


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress prints and deprecation notices (docs/inference.md says
    which path is maintained); errors still surface."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            with contextlib.redirect_stdout(_Discard()):
                yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def exported_size(path: Path) -> int:
    """Bytes of an export, with its sidecar JSON if it has one."""
    sidecar = path.with_suffix(".json")
    extra = sidecar.stat().st_size if path.suffix == ".safetensors" and sidecar.exists() else 0
    return path.stat().st_size + extra

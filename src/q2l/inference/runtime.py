"""Scorers: images (B, 3, H, W) preprocessed float32 -> probabilities (B, K) float32 on CPU.

One per kind of model file, all with the same call and a `ModelInfo`:
- `TorchScorer`: a module rebuilt from a q2l checkpoint or from an exported safetensors file, or
  a TorchScript export, run under the one autocast context (q2l.utils.amp) like evaluation;
- `OnnxScorer`: an exported .onnx file under ONNX Runtime (fp32).
`load_scorer` (ckpt= or model_file=, as the predict command takes them) picks by file, telling the
kinds apart with `model_file_kind`; q2l.inference.classifier.load does the same for any path.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from q2l.inference.model_info import ModelInfo
from q2l.utils import dist
from q2l.utils.amp import autocast, resolve_precision
from q2l.utils.errors import InputError

log = logging.getLogger(__name__)


class TorchScorer:
    """A PyTorch model's probabilities, on `device` in `precision` (fp32/bf16/fp16)."""

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        device: torch.device,
        precision: str,
        channels_last: bool = False,
    ) -> None:
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device, memory_format=self.memory_format)
        self.info = info
        self.device = device
        self.precision = precision
        self.description = f"PyTorch on {device}, {precision}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, memory_format=self.memory_format)
        with autocast(self.device, self.precision):
            logits = self.model(images)  # (B, K)
        return torch.sigmoid(logits.float()).cpu()


class OnnxScorer:
    """An exported .onnx model's probabilities under ONNX Runtime (CUDA if asked and present)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        ort = import_onnxruntime()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        # ORT's threads otherwise spin for a while after each run, taking the cores the
        # DataLoader workers decode the next batch on (and other jobs on a shared machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types for a bad file
            raise InputError(f"model_file={path}: ONNX Runtime cannot load it ({error})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "q2l" not in metadata:
            raise InputError(
                f"model_file={path} carries no q2l model record; export it with q2l-export"
            )
        self.info = ModelInfo.from_json(metadata["q2l"], str(path))
        self.description = f"ONNX Runtime ({self.session.get_providers()[0]}), fp32"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.info.input_name: images.float().contiguous().numpy()}
        (logits,) = self.session.run([self.info.output_name], feed)
        return torch.sigmoid(torch.from_numpy(logits).float())


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "ONNX models need onnxruntime: pip install 'q2l[export]' (make install has it)"
        ) from None
    return onnxruntime


def load_scorer(
    ckpt: str | None,
    model_file: str | None,
    weights: str = "auto",
    device: str = "auto",
    precision: str = "checkpoint",
) -> TorchScorer | OnnxScorer:
    """The scorer for `ckpt` (a q2l checkpoint) or `model_file` (a .onnx, .safetensors or
    TorchScript export).

    precision: "checkpoint" (what the run trained with, as eval uses; fp32 for an export) or
    auto/fp32/bf16/fp16; ONNX models always run in fp32.
    """
    if bool(ckpt) == bool(model_file):
        raise InputError(
            "pass exactly one of ckpt=PATH (a checkpoint) or model_file=PATH (.onnx, "
            ".safetensors or .torchscript.pt from q2l-export)"
        )
    if ckpt:
        return checkpoint_scorer(ckpt, weights, device, precision)
    path = _existing(model_file, "model_file")
    if model_file_kind(path) == "checkpoint":
        raise InputError(
            f"model_file={model_file} is not an export from q2l-export (.onnx, .safetensors, "
            ".torchscript.pt); pass a checkpoint as ckpt="
        )
    return export_scorer(path, device, precision)


def model_file_kind(path: Path) -> str:
    """ "onnx", "safetensors", "torchscript" or "checkpoint" (anything else, checked on load).

    A TorchScript export is a zip archive holding the extra file q2l.json (whatever its name);
    a checkpoint is a zip archive too, without it.
    """
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".safetensors"):
        return suffix[1:]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/extra/q2l.json") for name in archive.namelist()):
                return "torchscript"
    return "checkpoint"


def checkpoint_scorer(
    ckpt: str | Path, weights: str = "auto", device: str = "auto", precision: str = "checkpoint"
) -> TorchScorer:
    """A q2l checkpoint's model with `weights` (auto/raw/ema), in the run's precision by default."""
    from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint

    torch_device = dist.resolve_device(device)
    checkpoint = load_checkpoint(ckpt)
    module, chosen = model_from_checkpoint(checkpoint, weights)
    info = ModelInfo.from_checkpoint(checkpoint, chosen)
    chosen_precision, channels_last = run_settings(precision, torch_device, checkpoint)
    return TorchScorer(module, info, torch_device, chosen_precision, channels_last)


def export_scorer(
    path: Path, device: str = "auto", precision: str = "checkpoint"
) -> TorchScorer | OnnxScorer:
    """An export's scorer: ONNX under ONNX Runtime, safetensors rebuilt, TorchScript loaded."""
    torch_device = dist.resolve_device(device)
    kind = model_file_kind(path)
    if kind == "onnx":
        return OnnxScorer(path, torch_device.type)
    if kind == "safetensors":
        module, info = load_safetensors_export(path)
    else:
        module, info = load_torchscript_export(path)
    chosen_precision, channels_last = run_settings(precision, torch_device)
    scorer = TorchScorer(module, info, torch_device, chosen_precision, channels_last)
    if kind == "torchscript":
        scorer.description = f"TorchScript on {torch_device}, {chosen_precision}"
    return scorer


def _existing(path: str | Path, key: str) -> Path:
    found = Path(path).expanduser()
    if not found.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    return found


def run_settings(
    precision: str, device: torch.device, checkpoint: dict[str, Any] | None = None
) -> tuple[str, bool]:
    """(precision resolved for `device`, channels_last) to run a model in.

    precision "checkpoint" means the one `checkpoint`'s run trained (and validated) with, so the
    mAP it recorded is reproduced; fp32 for an exported model (`checkpoint` None). channels_last
    is the run's memory format (False for an exported model).
    """
    if checkpoint is None:
        recorded, channels_last = "fp32", False
    else:
        recorded = checkpoint.get("precision", "fp32")
        channels_last = checkpoint["config"]["trainer"].get("channels_last", False)
    chosen = recorded if precision == "checkpoint" else precision
    return resolve_precision(chosen, device), channels_last


def load_torchscript_export(path: Path) -> tuple[nn.Module, ModelInfo]:
    """The traced module and record (extra file q2l.json) of a TorchScript export, on the CPU."""
    extra = {"q2l.json": ""}
    with warnings.catch_warnings():
        # torch.jit.load warns that TorchScript is deprecated; docs/inference.md says so once.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as error:
            raise InputError(f"{path}: TorchScript cannot load it ({error})") from None
    if not extra["q2l.json"]:
        raise InputError(f"{path} carries no q2l model record; export it with q2l-export")
    return module, ModelInfo.from_json(extra["q2l.json"], str(path))


def load_safetensors_export(path: Path) -> tuple[nn.Module, ModelInfo]:
    """The module and record of a safetensors export (weights + `<stem>.json` beside it).

    The module is rebuilt from the record's model_config through the same allowlist as a
    checkpoint's config (nothing the file names is imported otherwise).
    """
    from safetensors.torch import load_file

    from q2l.training.build import build_model

    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{path} needs its model record {sidecar} (written by q2l-export)")
    info = ModelInfo.from_json(sidecar.read_text(), str(sidecar))
    module = build_model(info.model_config, len(info.class_names), pretrained=False, trusted=False)
    try:
        module.load_state_dict(load_file(str(path)))
    except Exception as error:  # safetensors' own errors for a truncated file; shape mismatches
        raise InputError(f"{path} does not fit the model its record describes: {error}") from None
    return module.eval(), info

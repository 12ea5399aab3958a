"""A trained model in Python: load a checkpoint or an export, score images, get named labels.

    import q2l

    model = q2l.load("outputs/.../checkpoints/best.pt")  # or an export: .onnx, .safetensors, ...
    model.class_names, model.thresholds, model.image_size
    for prediction in model.predict("photos/"):
        print(prediction.path, prediction.labels)

`Classifier` is q2l's one path from images to thresholded, named scores: `q2l-predict`
(q2l.inference.predict) streams its `prediction_batches` into a file, so the API and the command
give the same scores and labels. It is assembled from the inference parts: the scorers
(q2l.inference.runtime), evaluation's preprocessing (q2l.data.transforms.build_eval_transform with
the model record's size, mean and std), the readers that report an unreadable image instead of
failing (q2l.inference.inputs) and the threshold choice (q2l.inference.model_info).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, upright_rgb
from q2l.data.transforms import build_eval_transform
from q2l.inference.inputs import ImageFiles, collate, resolve_inputs
from q2l.inference.model_info import ModelInfo, choose_thresholds
from q2l.inference.runtime import (
    OnnxScorer,
    TorchScorer,
    checkpoint_scorer,
    export_scorer,
    model_file_kind,
)
from q2l.utils.errors import InputError
from q2l.utils.progress import track

log = logging.getLogger(__name__)

# What `Classifier.predict` takes: a folder, glob, .txt list or image file (as predict's input=),
# a PIL image, a preprocessed tensor (3, S, S) or (B, 3, S, S), or a list of files, folders,
# globs and PIL images.
Images = str | Path | Image.Image | torch.Tensor | Sequence[str | Path | Image.Image]


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    path: the image file as given (None for an image passed in memory).
    scores: every class's probability, {class name: score}, in the model's class order.
    labels: the classes whose score is at or above their class's threshold, in class order.
    error: why the image could not be read ("" when it was); then scores and labels are empty.
    """

    path: str | None
    scores: dict[str, float]
    labels: list[str]
    error: str = ""


class Classifier:
    """A loaded model with its classes, preprocessing and per-class thresholds (see `load`)."""

    def __init__(
        self,
        scorer: TorchScorer | OnnxScorer,
        thresholds: str = "auto",
        checkpoint: str | Path | None = None,
    ) -> None:
        """`scorer` with the thresholds `thresholds` selects (choose_thresholds: auto, run or
        a thresholds file; auto looks beside `checkpoint` first)."""
        self.scorer = scorer
        self.info: ModelInfo
        self.info, self.thresholds_note = choose_thresholds(
            scorer.info, thresholds, str(checkpoint) if checkpoint else None
        )
        self.transform = build_eval_transform(self.info.image_size, self.info.mean, self.info.std)
        self._thresholds = torch.tensor(self.info.class_thresholds(), dtype=torch.float64)  # (K,)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def thresholds(self) -> dict[str, float]:
        """{class name: threshold}: calibrated per class, or the run's threshold for each."""
        return dict(zip(self.info.class_names, self._thresholds.tolist(), strict=True))

    @property
    def image_size(self) -> int:
        """The side S of the square the model sees (images are resized to S x S)."""
        return self.info.image_size

    @property
    def description(self) -> str:
        """Where and how the model runs, e.g. "PyTorch on cpu, fp32"."""
        return self.scorer.description

    def __repr__(self) -> str:
        return (
            f"Classifier({len(self.info.class_names)} classes, {self.image_size} px, "
            f"{self.description}; {self.thresholds_note})"
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32: `image` as the model sees it (upright RGB, resized, normalised)."""
        return self.transform(upright_rgb(image))

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities of preprocessed `images` (B, 3, S, S), on the CPU."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InputError(
                f"images must be preprocessed (B, {', '.join(map(str, expected))}) tensors "
                f"(Classifier.preprocess makes them), got {tuple(images.shape)}"
            )
        return self.scorer(images)

    def predict(
        self,
        images: Images,
        batch_size: int = 32,
        num_workers: int = 0,
        progress_bar: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> list[Prediction]:
        """One `Prediction` per image, in input order (a folder's files sorted).

        An unreadable image (or one over `max_image_pixels`) is logged and gets a Prediction
        with its `error`; the others are scored. num_workers > 0 decodes files in that many
        processes (run the script under `if __name__ == "__main__":` then).
        """
        if not isinstance(images, torch.Tensor):
            images = _items(images)
        count = 1 if isinstance(images, torch.Tensor) and images.ndim == 3 else len(images)
        batches = self._batches(images, batch_size, num_workers, max_image_pixels)
        tracked = track(batches, math.ceil(count / batch_size), "predict", progress_bar)
        return [prediction for batch in tracked for prediction in batch]

    def prediction_batches(
        self,
        images: Images,
        batch_size: int = 32,
        num_workers: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Iterator[list[Prediction]]:
        """`predict`, streamed: a list of Predictions per batch of `batch_size` images."""
        if not isinstance(images, torch.Tensor):
            images = _items(images)
        return self._batches(images, batch_size, num_workers, max_image_pixels)

    def _batches(
        self,
        images: list[Path | Image.Image] | torch.Tensor,
        batch_size: int,
        num_workers: int,
        max_image_pixels: int | None,
    ) -> Iterator[list[Prediction]]:
        if isinstance(images, torch.Tensor):
            batches = (images[None] if images.ndim == 3 else images).split(batch_size)
            for batch in batches:
                yield self._predictions(batch, [None] * len(batch), [""] * len(batch))
            return
        paths = [None if isinstance(item, Image.Image) else str(item) for item in images]
        loader = DataLoader(
            ImageFiles(images, self.transform, self.image_size, max_pixels=max_image_pixels),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
        )
        for batch, indices, errors in loader:
            yield self._predictions(batch, [paths[i] for i in indices], errors)

    def _predictions(
        self, images: torch.Tensor, paths: list[str | None], errors: list[str]
    ) -> list[Prediction]:
        """Predictions of a batch (B, 3, S, S) whose rows with an `errors` entry are unreadable."""
        readable = [row for row, error in enumerate(errors) if not error]
        scores = self.scores(images[readable]) if readable else None  # (B', K)
        scored = dict(zip(readable, range(len(readable)), strict=True))
        names = self.info.class_names
        predictions = []
        for row, (path, error) in enumerate(zip(paths, errors, strict=True)):
            if error:
                log.warning("skipping unreadable image: %s", error)
                predictions.append(Prediction(path, {}, [], error))
                continue
            image_scores = scores[scored[row]]
            chosen = (image_scores.double() >= self._thresholds).tolist()
            labels = [name for name, keep in zip(names, chosen, strict=True) if keep]
            values = dict(zip(names, image_scores.tolist(), strict=True))
            predictions.append(Prediction(path, values, labels))
        return predictions


def load(
    path: str | Path,
    *,
    weights: str = "auto",
    device: str = "auto",
    precision: str = "checkpoint",
    thresholds: str = "auto",
) -> Classifier:
    """The model in `path`: a q2l checkpoint or an export of one (.onnx, .safetensors,
    .torchscript.pt from q2l-export).

    Args:
        weights: a checkpoint's auto (what scored best), raw or ema; an export holds the weights
            it was exported with.
        device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...
        precision: checkpoint (the run's own; fp32 for an export), auto, fp32, bf16 or fp16;
            ONNX always runs in fp32.
        thresholds: auto (calibrated thresholds beside the checkpoint or embedded in the export,
            else the run's), run (the run's threshold for every class) or a thresholds file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (q2l.load takes a checkpoint or an export from q2l-export)"
        )
    if model_file_kind(file) == "checkpoint":
        return Classifier(checkpoint_scorer(file, weights, device, precision), thresholds, file)
    scorer = export_scorer(file, device, precision)
    if weights not in ("auto", scorer.info.weights):
        raise InputError(
            f"{path} is an export of the {scorer.info.weights} weights; weights={weights} "
            "chooses among a checkpoint's"
        )
    return Classifier(scorer, thresholds)


def _items(images: Images) -> list[Path | Image.Image]:
    """The images `images` names, one entry each (see `Images`)."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (str, Path)):
        return list(resolve_inputs(str(images)))
    if not isinstance(images, Iterable):
        raise TypeError(f"cannot predict on a {type(images).__name__}; see q2l.Classifier.predict")
    items: list[Path | Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            items.append(item)
        elif _is_one_file(str(item)):
            # A listed file that does not exist is reported when its turn comes, as predict does.
            items.append(Path(item).expanduser())
        else:
            items.extend(resolve_inputs(str(item)))
    if not items:
        raise InputError("no images to predict on: the list is empty")
    return items


def _is_one_file(spec: str) -> bool:
    path = Path(spec).expanduser()
    return not path.is_dir() and (path.exists() or not any(c in spec for c in "*?["))

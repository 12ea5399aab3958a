"""q2l: Query2Label multi-label image classification with Hydra configs and a plain PyTorch loop.

The Python API (docs/inference.md, "Python API"):

    import q2l

    model = q2l.load("outputs/.../checkpoints/best.pt")  # or an export: .onnx, .safetensors, ...
    predictions = model.predict("photos/")  # [q2l.Prediction(path, scores, labels, error)]

`import q2l` stays cheap: torch and the rest load on the first use of `q2l.load`,
`q2l.Classifier` or `q2l.Prediction` (q2l.inference.classifier).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__", "load"]

if TYPE_CHECKING:
    from q2l.inference.classifier import Classifier, Prediction, load

_LAZY = {name: "q2l.inference.classifier" for name in ("Classifier", "Prediction", "load")}


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'q2l' has no attribute {name!r}")

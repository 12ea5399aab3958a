"""q2l: Query2Label multi-label image classification with Hydra configs and a plain PyTorch loop."""

__version__ = "0.1.0"

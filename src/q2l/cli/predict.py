"""`python predict.py` / `q2l-predict`: score a folder, glob or list of images with a checkpoint
or an export.

    python predict.py ckpt=outputs/.../checkpoints/best.pt input=photos/ output=predictions.jsonl
    q2l-predict model_file=best.onnx input='photos/**/*.jpg' output=predictions.csv  # or model=
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from q2l.cli.help import command_help, help_topic
from q2l.cli.reporting import run_command
from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.inference.predict import predict


def main() -> None:
    """q2l-predict / python predict.py. `model=PATH` is read as `model_file=PATH`: `model` is the
    head's config group, so Hydra would otherwise refuse it with a message about defaults lists."""
    topic = help_topic(sys.argv[1:])
    if topic is not None:
        print(command_help("predict", topic))
        return
    sys.argv[1:] = [
        "model_file=" + arg.partition("=")[2] if arg.startswith("model=") else arg
        for arg in sys.argv[1:]
    ]
    _hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    run_command("q2l-predict", _checked, cfg)


def _checked(cfg: DictConfig) -> None:
    check_values(cfg)
    predict(cfg)


if __name__ == "__main__":
    main()

"""`q2l-export`: a checkpoint as ONNX, TorchScript or weights-only safetensors.

q2l-export ckpt=outputs/.../checkpoints/best.pt format=onnx [output=model.onnx]
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from q2l.cli.help import command_help, help_topic
from q2l.cli.reporting import run_command
from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.inference.export import export


def main() -> None:
    """The command line: `--help`, else the Hydra app."""
    topic = help_topic(sys.argv[1:])
    if topic is not None:
        print(command_help("export", topic))
        return
    _hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    run_command("q2l-export", _checked, cfg)


def _checked(cfg: DictConfig) -> None:
    check_values(cfg)
    export(cfg)


if __name__ == "__main__":
    main()

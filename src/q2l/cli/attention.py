"""`q2l-attention`: where the top labels of one image looked.

q2l-attention ckpt=outputs/.../checkpoints/best.pt image=photo.jpg output=maps/ [top_k=3]
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from q2l.cli.help import command_help, help_topic
from q2l.cli.reporting import run_command
from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.inference.attention import write_attention_maps


def main() -> None:
    """The command line: `--help`, else the Hydra app."""
    topic = help_topic(sys.argv[1:])
    if topic is not None:
        print(command_help("attention", topic))
        return
    _hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="attention")
def _hydra_main(cfg: DictConfig) -> None:
    run_command("q2l-attention", _checked, cfg)


def _checked(cfg: DictConfig) -> None:
    check_values(cfg)
    write_attention_maps(cfg)


if __name__ == "__main__":
    main()

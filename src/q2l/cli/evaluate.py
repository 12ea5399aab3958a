"""`python eval.py` / `q2l-eval`: evaluate a checkpoint on its run's val split or any data set.

python eval.py ckpt=outputs/.../checkpoints/best.pt
python eval.py ckpt=... dataset=coco2014 dataset.root=/data/coco
python eval.py ckpt=... calibrate=f1 save_scores=true
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from q2l.cli.help import command_help, help_topic
from q2l.cli.reporting import run_command
from q2l.config import CONFIG_DIR
from q2l.evaluation.evaluate import run


def main() -> None:
    """The command line: `--help`, else the Hydra app."""
    topic = help_topic(sys.argv[1:])
    if topic is not None:
        print(command_help("eval", topic))
        return
    _hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float:
    return run_command("q2l-eval", run, cfg)


if __name__ == "__main__":
    main()

"""`python eval.py` / `q2l-eval`: evaluate a checkpoint on its run's val split or any data set.

python eval.py ckpt=outputs/.../checkpoints/best.pt
python eval.py ckpt=... dataset=coco2014 dataset.root=/data/coco
python eval.py ckpt=... calibrate=f1 save_scores=true
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from q2l.config import CONFIG_DIR
from q2l.evaluation.evaluate import run


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()

"""`q2l-export`: a checkpoint as ONNX, TorchScript or weights-only safetensors.

q2l-export ckpt=outputs/.../checkpoints/best.pt format=onnx [output=model.onnx]
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.inference.export import export


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    check_values(cfg)
    export(cfg)


if __name__ == "__main__":
    main()

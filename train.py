"""Train a genlab model: ``python train.py model=<method> data=<dataset> [overrides]``."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from genlab.cli import optimized_value, train

    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()

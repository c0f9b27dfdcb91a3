"""Sample a trained genlab model: ``python inference.py model=<method> ckpt_path=... prompt="..."``."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="inference")
def main(cfg: DictConfig) -> None:
    from genlab.cli import inference

    inference(cfg)


if __name__ == "__main__":
    main()

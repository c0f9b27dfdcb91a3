"""Compose genlab configs in-process, the way ``train.py`` / ``inference.py`` would, for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# a small but complete voxel VAE-GAN on 16^3 synthetic shapes: seconds per epoch on a CPU
TINY_VOXEL = [
    "model.voxel_size=16",
    "model.generator.hidden_channels=8",
    "model.generator.latent_dim=16",
    "model.generator.num_encoder_layers=3",
    "model.generator.num_decoder_layers=3",
    "model.discriminator.hidden_channels=8",
    "model.discriminator.num_layers=3",
    "model.text_encoder.embed_dim=32",
    "data.dataset.num_per_class=8",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "extras.print_config=false",
]


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose with Hydra's runtime fields filled in and every output under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    # like @hydra.main: the composed config is saved in the run directory
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    return cfg

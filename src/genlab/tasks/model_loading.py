"""Rebuild a trained model for inference: the training run's model config + command-line overrides + weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genlab.distributed import is_deepspeed_checkpoint
from genlab.models.base import load_weights

log = logging.getLogger(__name__)


def run_config_for(ckpt_path: Path) -> DictConfig | None:
    """The ``.hydra/config.yaml`` of the run that wrote ``ckpt_path`` (``<run>/checkpoints/x.ckpt`` or ``<run>/x``)."""
    for run_dir in (ckpt_path.parent.parent, ckpt_path.parent):
        cfg_file = run_dir / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            return OmegaConf.load(cfg_file)
    return None


def model_overrides() -> list[str]:
    """``model.*`` / ``model/*`` overrides given on this command line (empty outside a Hydra app)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("model.")]


def build_model(cfg: DictConfig, without: Sequence[str] = ()):
    """Instantiate ``cfg.model`` (or the training run's model config) and load ``cfg.ckpt_path`` into it.

    ``without``: model keys set to null before building, for parts that only training uses
    (validation scorers whose weights would otherwise be loaded or downloaded for nothing).
    """
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path is required: pass ckpt_path=<run>/checkpoints/last.ckpt (or a .safetensors)"
        )
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not (ckpt.is_file() or is_deepspeed_checkpoint(ckpt)):
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such file")
    model_cfg = cfg.model
    train_cfg = run_config_for(ckpt)
    if train_cfg is not None:
        overrides = OmegaConf.from_dotlist([o.lstrip("+") for o in model_overrides() if "=" in o])
        train_cfg = OmegaConf.merge(train_cfg, overrides)
        model_cfg = train_cfg.model
        log.info("model config from the training run of %s", ckpt)
    else:
        log.warning(
            "no .hydra/config.yaml beside %s: building the model from this command line's config",
            ckpt,
        )
    if without:
        model_cfg = model_cfg.copy()
        for key in without:
            if key in model_cfg:
                model_cfg[key] = None
    model = instantiate(model_cfg)
    load_weights(model, ckpt)
    return model.eval()

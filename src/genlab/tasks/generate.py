"""``python inference.py task=generate``: sample a trained model for prompts and write meshes/images + previews."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from genlab.samples import write_samples
from genlab.tasks.model_loading import build_model

log = logging.getLogger(__name__)


def prompts_of(cfg: DictConfig) -> list[str]:
    """``prompt=...`` (one) or ``prompts=[...]``; none means unconditional (empty prompt)."""
    if cfg.get("prompt") is not None and cfg.get("prompts"):
        raise ValueError("give either prompt=... or prompts=[...], not both")
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)]
    return [str(p) for p in cfg.get("prompts") or [""]]


def generate(cfg: DictConfig, mesh_format: str = "obj") -> list[Path]:
    """Write ``num_samples`` samples per prompt to ``<run>/samples/`` and return the written files."""
    prompts = prompts_of(cfg)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    samples = model.sample(prompts, int(cfg.num_samples), generator)
    written, grid = write_samples(samples, Path(cfg.paths.output_dir) / "samples", mesh_format)
    files = (
        [w.mesh_path for w in written if w.mesh_path] + [w.preview_path for w in written] + [grid]
    )
    empty = [w.sample.stem for w in written if w.mesh_path is None and w.sample.image is None]
    if empty:
        log.warning("no surface for %s (try another model.mesh_extraction.level)", ", ".join(empty))
    log.info("wrote %d samples for %d prompt(s) to %s", len(written), len(prompts), grid.parent)
    return files

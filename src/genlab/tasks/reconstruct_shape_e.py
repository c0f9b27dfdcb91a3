"""``python inference.py model=shape_e_encoder ckpt_path=<run>/model.safetensors points=cloud.ply``:
encode point clouds with a trained Shap-E encoder and decode the latents to meshes.

``points=path`` (one file) or ``points=[...]``: point clouds (``.npy``/``.ply``, colours used when
present), resampled to ``num_points`` as the ``encode`` stage does. Writes, per cloud, the
reconstruction as ``<stem>_00.<format>`` for every ``mesh_formats`` entry, a PNG preview and
``grid.png`` into ``<run>/samples/``, and the latent as ``<stem>_00.latent.pt`` (the file the
``encode`` stage would write), so the encoder's quality can be looked at before encoding a data set.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from genlab.atomic import write_bytes_atomic
from genlab.geometry.mesh_io import save_mesh
from genlab.models.shape_e.decode import decode_meshes
from genlab.models.shape_e.encode import load_points
from genlab.samples import Sample, write_samples
from genlab.tasks.model_loading import build_model

log = logging.getLogger(__name__)


def point_files_of(cfg: DictConfig) -> list[Path]:
    """``points=...`` (one file) or ``points=[...]``: existing point-cloud files."""
    given = cfg.get("points")
    if not given:
        raise ValueError("points=<cloud.ply|.npy> (or points=[a.ply,b.npy]) is required")
    paths = [Path(str(p)).expanduser() for p in ([given] if isinstance(given, str) else given)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"points={path}: no such file")
    return paths


def reconstruct_shape_e(
    cfg: DictConfig, mesh_formats: Sequence[str] = ("obj", "ply", "glb"), num_points: int = 16384
) -> list[Path]:
    """Encode -> decode every cloud of ``points``; return the files written."""
    files = point_files_of(cfg)
    module = build_model(cfg)
    samples, latents = [], []
    for path in files:
        points, colors = load_points(path, num_points, path.stem)
        batch = {
            "points": torch.from_numpy(points).float()[None],
            "point_colors": torch.from_numpy(colors).float()[None],
        }
        with torch.no_grad():
            latent = module.encode(batch)
        with warnings.catch_warnings(record=True):
            (mesh,) = decode_meshes(module.renderer, latent, grid_size=module.sample_grid_size)
        if mesh is None:
            log.warning("%s: the decoded field has no surface", path)
        samples.append(Sample(prompt=path.stem, index=0, mesh=mesh))
        latents.append(latent[0].cpu())
    out = Path(cfg.paths.output_dir) / "samples"
    written, grid = write_samples(samples, out, mesh_formats[0])
    paths = [grid]
    for w, latent in zip(written, latents, strict=True):
        paths.append(w.preview_path)
        if w.mesh_path is not None:
            paths += [w.mesh_path]
            for fmt in mesh_formats[1:]:
                paths.append(save_mesh(w.sample.mesh, out / f"{w.sample.stem}.{fmt}"))
        buffer = io.BytesIO()
        torch.save(latent.contiguous(), buffer)
        latent_path = out / f"{w.sample.stem}.latent.pt"
        write_bytes_atomic(latent_path, buffer.getvalue())
        paths.append(latent_path)
    log.info("reconstructed %d point cloud(s) into %s", len(files), out)
    return paths

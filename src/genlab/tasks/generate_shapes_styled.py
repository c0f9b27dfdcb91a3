"""``python inference.py model=otuken3d ckpt_path=... prompt="..." style="..."``: styled shapes.

Prompts (``prompt=`` or ``prompts=[...]``) and a style description (``style=``), optionally
mixed toward a second style (``style_b=``, ``style_mix=`` in [0, 1], ``task.mix_scope``: all,
global = coarse form only, local = fine detail only), at ``voxel_size`` (null: the size the
run trained last); ``reference_points=<file>`` conditions on a point cloud as well (or
alone, without a prompt). Each sample's occupancy grid becomes a mesh by marching cubes, written in
every format of ``task.mesh_formats`` (obj / ply / glb / off / stl) with a PNG preview and
``grid.png`` to ``<run>/samples/``. Model loading and file writing are the shared ones of
``task=generate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from genlab.geometry.mesh_io import SAVE_FORMATS, save_mesh
from genlab.samples import write_samples
from genlab.tasks.generate import prompts_of
from genlab.tasks.model_loading import build_model

log = logging.getLogger(__name__)


def _formats(mesh_formats: Sequence[str] | str) -> list[str]:
    formats = [mesh_formats] if isinstance(mesh_formats, str) else list(mesh_formats)
    formats = [f".{str(f).lower().lstrip('.')}" for f in formats]
    unknown = [f for f in formats if f not in SAVE_FORMATS]
    if not formats or unknown:
        raise ValueError(
            f"task.mesh_formats={list(mesh_formats)}: unsupported {unknown or 'empty list'} "
            f"(supported: {', '.join(SAVE_FORMATS)})"
        )
    return [f.lstrip(".") for f in formats]


def reference_points(
    path: str | Path, num_points: int = 2048, margin: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """A reference point cloud file (.npy .ply .xyz .txt) as ``(num_points, 3)`` in the unit cube.

    Centred on its bounding box and scaled so the longest side is ``1 - 2 * margin`` (the
    convention of ``genlab.data.meshes.normalize_to_unit_cube``), then resampled by farthest
    point sampling.
    """
    import numpy as np
    import trimesh

    from genlab.data.meshes import normalize_to_unit_cube
    from genlab.data.point_clouds import read_point_cloud, resample

    points, _ = read_point_cloud(path)
    try:
        cloud = normalize_to_unit_cube(trimesh.PointCloud(points), margin=margin)
    except ValueError as err:
        raise ValueError(f"reference_points={path}: {err}") from err
    picked, _ = resample(np.asarray(cloud.vertices), num_points, rng=np.random.default_rng(seed))
    return torch.as_tensor(picked, dtype=torch.float32)


def generate_shapes_styled(
    cfg: DictConfig,
    mesh_formats: Sequence[str] | str = ("obj", "ply", "glb"),
    mix_scope: str = "all",
    num_points: int = 2048,
    points_margin: float = 0.0,
) -> list[Path]:
    """Write ``num_samples`` styled meshes per prompt (all formats) + previews; return the files.

    ``reference_points=<file>`` (top-level key) adds point-cloud conditioning: the same cloud
    for every prompt (``prompt`` may then be left out: points only).
    """
    formats = _formats(mesh_formats)
    prompts = prompts_of(cfg)
    points = None
    if cfg.get("reference_points"):
        cloud = reference_points(cfg.reference_points, num_points, points_margin, int(cfg.seed))
        points = cloud[None].expand(len(prompts), -1, -1)
    style_mix = float(cfg.get("style_mix") or 0.0)
    if not 0.0 <= style_mix <= 1.0:
        raise ValueError(f"style_mix must lie in [0, 1], got {style_mix}")
    if style_mix > 0 and not cfg.get("style_b"):
        raise ValueError(f"style_mix={style_mix} needs a second style: style_b=...")
    model = build_model(cfg, without=("fid",))
    samples = model.sample(
        prompts,
        int(cfg.num_samples),
        torch.Generator().manual_seed(int(cfg.seed)),
        style=str(cfg.get("style") or ""),
        style_b=str(cfg.style_b) if cfg.get("style_b") else None,
        style_mix=style_mix,
        mix_scope=mix_scope,
        voxel_size=cfg.get("voxel_size"),
        points=points,
    )
    out = Path(cfg.paths.output_dir) / "samples"
    written, grid = write_samples(samples, out, formats[0])
    files = [w.mesh_path for w in written if w.mesh_path]
    for fmt in formats[1:]:
        files += [
            save_mesh(w.sample.mesh, out / f"{w.sample.stem}.{fmt}") for w in written if w.mesh_path
        ]
    files += [w.preview_path for w in written] + [grid]
    empty = [w.sample.stem for w in written if w.mesh_path is None]
    if empty:
        log.warning("no surface for %s (try another model.mesh_extraction.level)", ", ".join(empty))
    log.info(
        "wrote %d samples (%s) for %d prompt(s), style %r, to %s",
        len(written),
        "/".join(formats),
        len(prompts),
        cfg.get("style") or "",
        out,
    )
    return files

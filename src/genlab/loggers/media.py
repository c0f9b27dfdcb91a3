"""Logger-agnostic image and mesh logging for callbacks.

Each helper dispatches on the logger type: ClearML (debug samples), TensorBoard (image and
mesh summaries), Weights & Biases (``wandb.Image`` / ``wandb.Object3D``) and CSV (nothing:
the files already live in the run directory). Unknown logger types are skipped.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from genlab.loggers.clearml import ClearMLLogger

log = logging.getLogger(__name__)

LoggersArg = Logger | Iterable[Logger] | None

# File types wandb.Object3D reads from disk.
_WANDB_3D_SUFFIXES = (".obj", ".gltf", ".glb", ".babylon", ".stl", ".pts.json")


def _as_list(loggers: LoggersArg) -> list[Any]:
    if loggers is None:
        return []
    if isinstance(loggers, Logger):
        return [loggers]
    return list(loggers)


def _image_chw(image: Image.Image) -> np.ndarray:
    mode = "RGBA" if "A" in image.getbands() else "RGB"
    return np.asarray(image.convert(mode)).transpose(2, 0, 1).copy()


def _dispatch_failed(logger: Any, what: str, key: str) -> None:
    log.warning("Could not log %s %r to %s", what, key, type(logger).__name__, exc_info=True)


@rank_zero_only
def log_image(loggers: LoggersArg, key: str, image: Image.Image, step: int) -> None:
    """Log a PIL image under ``key`` at ``step`` to every supported logger in ``loggers``."""
    for logger in _as_list(loggers):
        try:
            if isinstance(logger, ClearMLLogger):
                logger.log_image(key, image, step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    key, _image_chw(image), global_step=step, dataformats="CHW"
                )
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[image], step=step)
            elif isinstance(logger, CSVLogger):
                continue
        except Exception:
            _dispatch_failed(logger, "image", key)


def _mesh_tensors(mesh: trimesh.Trimesh) -> dict[str, torch.Tensor | None]:
    vertices = torch.as_tensor(np.asarray(mesh.vertices, dtype=np.float32)).unsqueeze(0)
    faces = None
    if len(mesh.faces):
        faces = torch.as_tensor(np.asarray(mesh.faces, dtype=np.int32)).unsqueeze(0)
    colors = None
    visual = getattr(mesh, "visual", None)
    if visual is not None and getattr(visual, "kind", None) == "vertex":
        rgb = np.asarray(visual.vertex_colors)[:, :3].astype(np.uint8)
        if len(rgb) == len(mesh.vertices):
            colors = torch.as_tensor(rgb).unsqueeze(0)
    return {"vertices": vertices, "faces": faces, "colors": colors}


def _wandb_object3d(mesh: trimesh.Trimesh, path: Path) -> Any:
    import wandb

    if path.name.lower().endswith(_WANDB_3D_SUFFIXES):
        return wandb.Object3D(str(path))
    # e.g. PLY: wandb cannot read it, hand it a GLB copy (wandb copies the file when logging)
    glb = Path(tempfile.mkdtemp(prefix="genlab-wandb-")) / f"{path.stem}.glb"
    mesh.export(glb)
    return wandb.Object3D(str(glb))


@rank_zero_only
def log_mesh(loggers: LoggersArg, key: str, mesh: trimesh.Trimesh, path: Path, step: int) -> None:
    """Log a mesh under ``key`` at ``step`` to every supported logger in ``loggers``.

    ``path`` is the mesh file in the run directory (OBJ/PLY/GLB); it is written from
    ``mesh`` when it does not exist yet. File-based loggers (ClearML, wandb) log that file.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        mesh.export(path)
    for logger in _as_list(loggers):
        try:
            if isinstance(logger, ClearMLLogger):
                logger.log_file(key, path, step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_mesh(key, global_step=step, **_mesh_tensors(mesh))
            elif isinstance(logger, WandbLogger):
                logger.log_metrics({key: _wandb_object3d(mesh, path)}, step=step)
            elif isinstance(logger, CSVLogger):
                continue
        except Exception:
            _dispatch_failed(logger, "mesh", key)

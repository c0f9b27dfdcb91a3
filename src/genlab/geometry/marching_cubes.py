"""Marching cubes: occupancy/probability grids -> triangle meshes in genlab's unit cube.

Values above ``level`` are inside. Vertices use the grid convention of
:mod:`genlab.geometry.voxelize`: voxel ``(i, j, k)`` is the sample at the voxel centre
``((i, j, k) + 0.5) / R - 0.5`` and the grid covers ``[-0.5, 0.5]^3`` (each axis spans
the cube, also for non-cubic grids).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import trimesh
from scipy import ndimage
from skimage import measure

from genlab.geometry.voxelize import index_to_world

__all__ = ["IsoLevelWarning", "MeshExtractor", "extract_mesh"]


class IsoLevelWarning(UserWarning):
    """The requested iso-level does not cross the grid's values."""


def extract_mesh(volume: Any, level: float = 0.5, sigma: float = 0.0) -> trimesh.Trimesh | None:
    """Triangle mesh of the ``level`` iso-surface of a 3-D grid (numpy array or torch tensor).

    ``sigma`` > 0 smooths the grid first (Gaussian, in voxels). The grid is padded by one
    voxel of its minimum so shapes touching the border come out closed. Faces are oriented
    with outward normals. When ``level`` lies outside the (smoothed) value range an
    :class:`IsoLevelWarning` is emitted and the midpoint of the range is used instead; a
    constant grid gives the warning and ``None``.
    """
    grid = _as_grid(volume)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma > 0:
        grid = ndimage.gaussian_filter(grid, sigma=sigma)
    level = _checked_level(grid, float(level))
    if level is None:
        return None
    verts, faces = marching_cubes_index_space(grid, level, pad=True)
    if len(faces) == 0:
        return None
    vertices = index_to_world(verts, grid.shape)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


def marching_cubes_index_space(
    grid: np.ndarray, level: float, pad: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Raw marching cubes: vertices ``float32 (V, 3)`` in index space of ``grid``, faces ``(F, 3)``.

    Index space: vertex ``(a, b, c)`` lies at ``grid[a, b, c]`` when integral. With ``pad``
    the grid is padded by one voxel of its minimum (vertices still refer to the unpadded
    grid). Degenerate triangles are dropped (``allow_degenerate=False``), which gives the
    same vertices and face count as pytorch3d's reference. Faces are wound so that normals
    point from high to low values.
    """
    if pad:
        grid = np.pad(grid, 1, mode="constant", constant_values=grid.min())
    verts, faces, _, _ = measure.marching_cubes(grid, level=level, allow_degenerate=False)
    if pad:
        verts -= 1.0
    # skimage's winding gives normals pointing towards higher values for (i, j, k) = (x, y, z)
    # (inward for "high inside" grids); reverse it so normals point outward.
    return verts.astype(np.float32), np.ascontiguousarray(faces[:, ::-1], dtype=np.int64)


def _as_grid(volume: Any) -> np.ndarray:
    """Float numpy grid from a numpy array or torch tensor; checks it is 3-D."""
    if hasattr(volume, "detach"):  # torch.Tensor, without importing torch here
        volume = volume.detach().cpu().float().numpy()
    grid = np.asarray(volume)
    if grid.ndim != 3:
        raise ValueError(
            f"expected a 3-D grid (X, Y, Z), got shape {tuple(grid.shape)}"
            + ("; select the channel first, e.g. volume[0]" if grid.ndim == 4 else "")
        )
    if min(grid.shape) < 2:
        raise ValueError(f"grid must have at least 2 samples per axis, got shape {grid.shape}")
    dtype = np.float64 if grid.dtype == np.float64 else np.float32
    return np.ascontiguousarray(grid, dtype=dtype)


def _checked_level(grid: np.ndarray, level: float) -> float | None:
    """Return a usable iso-level; warn and fall back to the range midpoint (None if constant)."""
    lo, hi = float(grid.min()), float(grid.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("grid contains NaN or infinite values")
    if lo < level < hi:
        return level
    if lo == hi:
        warnings.warn(
            f"iso-level {level:g} is outside the grid's value range [{lo:g}, {hi:g}]: the grid "
            "is constant, there is no surface to extract",
            IsoLevelWarning,
            stacklevel=3,
        )
        return None
    mid = (lo + hi) / 2.0
    warnings.warn(
        f"iso-level {level:g} is outside the grid's value range [{lo:g}, {hi:g}]; "
        f"using the midpoint {mid:g} instead",
        IsoLevelWarning,
        stacklevel=3,
    )
    return mid


@dataclass
class MeshExtractor:
    """Configured :func:`extract_mesh` (for Hydra configs): ``extractor(volume) -> mesh``."""

    level: float = 0.5
    sigma: float = 0.0

    def __call__(self, volume: Any) -> trimesh.Trimesh | None:
        return extract_mesh(volume, level=self.level, sigma=self.sigma)

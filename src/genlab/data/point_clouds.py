"""Point-cloud reading (.npy, .ply, .xyz, .txt) and resampling to a fixed size.

Every reading problem raises :class:`PointCloudReadError`, whose message names the file and
the problem, e.g. ``"chair.npy: 12 of 2048 points have non-finite coordinates (NaN or inf)"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import trimesh

from genlab.data.errors import DataFileError

__all__ = [
    "POINT_CLOUD_EXTENSIONS",
    "PointCloudReadError",
    "farthest_point_indices",
    "read_point_cloud",
    "resample",
]

#: File extensions :func:`read_point_cloud` understands (lower case, with the dot).
POINT_CLOUD_EXTENSIONS: tuple[str, ...] = (".npy", ".ply", ".xyz", ".txt")

SampleMethod = Literal["fps", "random"]


class PointCloudReadError(DataFileError):
    """A point-cloud file could not be read; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_point_cloud(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read points ``float32 (N, 3)`` and colours ``float32 (N, 3)`` in [0, 1] (or None).

    ``.npy`` arrays may be ``(N, 3)``, ``(3, N)`` (transposed back) or ``(N, 6)`` xyz+rgb
    (colours as 0-255 integers or floats, or 0-1 floats); shapes that read both ways, such
    as ``(3, 3)``, are rejected as ambiguous. ``.ply`` (point-only, ``element face 0`` or no
    face element, ASCII or binary; the vertices of a mesh PLY) and whitespace-separated
    ``.xyz``/``.txt`` (``x y z [r g b [a]]``) are read with trimesh. Raises
    :class:`PointCloudReadError` for missing or unreadable files, bad shapes, empty clouds
    and non-finite coordinates.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in POINT_CLOUD_EXTENSIONS:
        raise PointCloudReadError(
            path,
            f"unsupported point-cloud extension {suffix!r} "
            f"(supported: {', '.join(POINT_CLOUD_EXTENSIONS)})",
        )
    if not Path(path).is_file():
        raise PointCloudReadError(
            path, "file not found" if not Path(path).exists() else "not a file"
        )
    if suffix == ".npy":
        points, colors = _read_npy(path)
    else:
        points, colors = _read_with_trimesh(path, suffix)
    if len(points) == 0:
        raise PointCloudReadError(path, "empty point cloud (0 points)")
    bad = int((~np.isfinite(points).all(axis=1)).sum())
    if bad:
        raise PointCloudReadError(
            path, f"{bad} of {len(points)} points have non-finite coordinates (NaN or inf)"
        )
    points = points.astype(np.float32)
    return points, None if colors is None else colors.astype(np.float32)


def _read_npy(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``.npy`` array -> (points, colours in [0, 1] or None)."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # ValueError (pickled/garbled header), OSError, EOFError...
        raise PointCloudReadError(path, f"cannot read .npy: {type(err).__name__}: {err}") from err
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load of a .npy
        raise PointCloudReadError(path, "expected one array")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise PointCloudReadError(path, f"expected a numeric array, got dtype {array.dtype}")
    array = _as_rows(path, array)
    points = array[:, :3].astype(np.float64)
    if array.shape[1] == 3:
        return points, None
    return points, _normalise_colors(path, array[:, 3:6])


def _as_rows(path: str | os.PathLike[str], array: np.ndarray) -> np.ndarray:
    """Return ``array`` as (N, 3|6), transposing (3|6, N); reject ambiguous shapes."""
    expected = "expected shape (N, 3), (3, N) or (N, 6)"
    if array.ndim != 2:
        raise PointCloudReadError(path, f"{expected}, got {array.ndim}-D shape {array.shape}")
    rows_ok, cols_ok = array.shape[1] in (3, 6), array.shape[0] in (3, 6)
    if rows_ok and cols_ok:
        raise PointCloudReadError(
            path,
            f"ambiguous shape {array.shape}: cannot tell points in rows from points in "
            "columns; store (N, 3) or (N, 6) with N not 3 or 6",
        )
    if rows_ok:
        return array
    if cols_ok:
        return array.T
    raise PointCloudReadError(path, f"{expected}, got shape {array.shape}")


def _normalise_colors(path: str | os.PathLike[str], colors: np.ndarray) -> np.ndarray:
    """Colours as 0-255 (integers, or floats above 1) or 0-1 floats -> float64 in [0, 1]."""
    values = colors.astype(np.float64)
    if not np.isfinite(values).all():
        raise PointCloudReadError(path, "non-finite colour values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > 255:
        raise PointCloudReadError(
            path, f"colour values must be in [0, 1] or [0, 255], got [{lo:g}, {hi:g}]"
        )
    if np.issubdtype(colors.dtype, np.integer) or hi > 1:
        values = values / 255.0
    return values


def _read_with_trimesh(
    path: str | os.PathLike[str], suffix: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """PLY/XYZ/TXT through trimesh -> (points, colours in [0, 1] or None)."""
    file_type = "xyz" if suffix in (".xyz", ".txt") else suffix[1:]
    if file_type == "xyz" and not Path(path).read_bytes().strip():
        return np.zeros((0, 3)), None
    try:
        geometry = trimesh.load(os.fspath(path), file_type=file_type, process=False)
    except Exception as err:  # trimesh raises many types for malformed files
        raise PointCloudReadError(
            path, f"cannot read point cloud: {type(err).__name__}: {err}"
        ) from err
    if isinstance(geometry, trimesh.Scene):
        geometry = _single_geometry(path, geometry)
        if geometry is None:
            return np.zeros((0, 3)), None
    points = np.asarray(geometry.vertices, dtype=np.float64).reshape(-1, 3)
    return points, _trimesh_colors(geometry, len(points))


def _single_geometry(
    path: str | os.PathLike[str], scene: trimesh.Scene
) -> trimesh.PointCloud | trimesh.Trimesh | None:
    """The one geometry of a scene (None when empty)."""
    geometries = list(scene.geometry.values())
    if not geometries:
        return None
    if len(geometries) > 1:
        raise PointCloudReadError(path, f"expected one point cloud, found {len(geometries)}")
    return geometries[0]


def _trimesh_colors(geometry: object, count: int) -> np.ndarray | None:
    """Per-point RGB in [0, 1] from a trimesh PointCloud or vertex-coloured mesh, else None."""
    if isinstance(geometry, trimesh.PointCloud):
        colors = np.asarray(geometry.colors)
    elif isinstance(geometry, trimesh.Trimesh) and geometry.visual.kind == "vertex":
        colors = np.asarray(geometry.visual.vertex_colors)
    else:
        return None
    if colors.ndim != 2 or len(colors) != count or colors.shape[1] < 3:
        return None
    return colors[:, :3].astype(np.float64) / 255.0


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def resample(
    points: np.ndarray,
    n: int = 16384,
    method: SampleMethod = "fps",
    rng: np.random.Generator | None = None,
    colors: np.ndarray | None = None,
    fps_max_input: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pick ``n`` points (and their colours) from ``points`` ``(N, 3)``.

    ``"random"`` draws without replacement; ``"fps"`` runs exact farthest-point sampling
    from a random start point (O(N * n): about 0.7 s for N = 100k, n = 4096 on one CPU
    core). ``fps_max_input`` (e.g. ``8 * n``) bounds that cost for huge clouds by first
    drawing that many points at random, at a small loss of coverage. When N <= n every
    point is kept once (shuffled) and the remaining ``n - N`` are drawn with replacement.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"expected a non-empty (N, 3) array, got shape {points.shape}")
    if colors is not None and len(colors) != len(points):
        raise ValueError(f"got {len(colors)} colours for {len(points)} points")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if fps_max_input is not None and fps_max_input < n:
        raise ValueError(f"fps_max_input ({fps_max_input}) must be at least n ({n})")
    if method not in ("fps", "random"):
        raise ValueError(f"unknown sampling method {method!r} (use 'fps' or 'random')")
    rng = rng if rng is not None else np.random.default_rng()
    count = len(points)
    if count <= n:
        index = rng.permutation(count)
        if count < n:
            index = np.concatenate([index, rng.integers(0, count, n - count)])
    elif method == "random":
        index = rng.choice(count, n, replace=False)
    else:
        index = np.arange(count)
        if fps_max_input is not None and count > fps_max_input:
            index = rng.choice(count, fps_max_input, replace=False)
        index = index[farthest_point_indices(points[index], n, start=int(rng.integers(len(index))))]
    return points[index], None if colors is None else colors[index]


def farthest_point_indices(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices of ``n`` farthest-point samples of ``points`` ``(N, 3)``, N >= n, from ``start``.

    Each step adds the point farthest from those chosen so far; vectorised over the points,
    O(N * n) time and O(N) memory.
    """
    coords = np.ascontiguousarray(np.asarray(points, dtype=np.float32).T)  # (3, N)
    x, y, z = coords
    count = coords.shape[1]
    if not 0 < n <= count:
        raise ValueError(f"cannot pick {n} of {count} points")
    chosen = np.empty(n, dtype=np.int64)
    nearest = np.full(count, np.inf, dtype=np.float32)
    dist = np.empty(count, dtype=np.float32)
    tmp = np.empty(count, dtype=np.float32)
    current = start
    for i in range(n):
        chosen[i] = current
        px, py, pz = x[current], y[current], z[current]
        np.subtract(x, px, out=dist)
        np.multiply(dist, dist, out=dist)
        np.subtract(y, py, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        np.add(dist, tmp, out=dist)
        np.subtract(z, pz, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        np.add(dist, tmp, out=dist)
        np.minimum(nearest, dist, out=nearest)
        current = int(nearest.argmax())
    return chosen

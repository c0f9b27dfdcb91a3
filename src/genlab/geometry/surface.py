"""Uniform (area-weighted) point sampling of mesh surfaces, with face normals."""

from __future__ import annotations

import numpy as np
import trimesh

__all__ = ["sample_surface"]


def sample_surface(
    mesh: trimesh.Trimesh, count: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniformly distributed over the surface of ``mesh``, and their normals.

    Faces are picked with probability proportional to their area and points drawn uniformly
    inside them; the normals are the unit normals of the faces the points lie on (following
    the face winding). Returns float32 ``(count, 3)`` points and normals, the same for the
    same ``seed``. Raises ``ValueError`` for a negative ``count``, non-finite vertices and
    meshes without faces or with zero surface area.
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise ValueError("cannot sample the surface of a mesh with no faces")
    if not np.isfinite(vertices).all():
        raise ValueError("cannot sample the surface of a mesh with non-finite vertices")
    corners = vertices[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    total = float(double_area.sum())
    if not total > 0:
        raise ValueError(f"cannot sample the surface of a mesh with zero area ({len(faces)} faces)")
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(double_area)
    picked = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    picked = np.minimum(picked, len(faces) - 1)  # guards against rounding at the very end
    # uniform in a triangle: fold the unit square onto the lower-left half
    r = rng.random((count, 2))
    flip = r.sum(axis=1) > 1.0
    r[flip] = 1.0 - r[flip]
    a, b, c = corners[picked, 0], corners[picked, 1], corners[picked, 2]
    points = a + r[:, :1] * (b - a) + r[:, 1:] * (c - a)
    normals = cross[picked] / double_area[picked, None]
    return points.astype(np.float32), normals.astype(np.float32)

"""A small numpy z-buffer renderer: shaded colour, world-space normal maps, masks and depth.

For logs and for making multi-view training data without a GPU renderer. Triangles are
projected with the camera's pinhole intrinsics (see :mod:`genlab.data.cameras` for the
conventions) and rasterised at pixel centres ``(u + 0.5, v + 0.5)``, one sample per pixel
(no antialiasing), with a per-pixel depth test. Triangles with a vertex behind or within
:data:`NEAR` of the camera plane are skipped (not clipped).

Normals are interpolated barycentrically (perspective-correct) from per-corner normals: the
vertex normal where it is within :data:`CREASE_DEG` of the face normal (smooth surfaces),
the face normal otherwise (sharp edges stay sharp). Faces seen from behind have their normals
flipped, so open meshes and meshes with inconsistent winding shade as seen from the camera.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trimesh

from genlab.data.cameras import Camera

__all__ = ["CREASE_DEG", "NEAR", "RenderedView", "render_view"]

#: Triangles with a vertex at camera depth below this (world units) are skipped.
NEAR = 1e-6
#: Corners whose vertex normal is further than this from the face normal use the face normal.
CREASE_DEG = 30.0
_AMBIENT = 0.3
# most (pixel, triangle) candidate pairs looked at at once; bounds the memory use
_CHUNK_FRAGMENTS = 1 << 20


@dataclass
class RenderedView:
    """One rendered view; ``H x W`` is the camera's image size."""

    rgb: np.ndarray  # (H, W, 3) uint8: Lambert-shaded object on the background colour
    normal: np.ndarray  # (H, W, 3) uint8: world normals as (n * 0.5 + 0.5) * 255, else background
    mask: np.ndarray  # (H, W) bool: pixels covered by the object
    depth: np.ndarray  # (H, W) float32: camera z of the surface, inf outside the mask

    def rgba(self) -> np.ndarray:
        """The colour image with alpha = mask * 255, ``(H, W, 4)`` uint8."""
        return _with_alpha(self.rgb, self.mask)

    def normal_rgba(self) -> np.ndarray:
        """The normal map with alpha = mask * 255, ``(H, W, 4)`` uint8."""
        return _with_alpha(self.normal, self.mask)


def _with_alpha(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    alpha = (mask.astype(np.uint8) * 255)[..., None]
    return np.concatenate([image, alpha], axis=-1)


def render_view(
    mesh: trimesh.Trimesh,
    camera: Camera,
    color: Sequence[int] = (200, 180, 150),
    background: Sequence[int] = (255, 255, 255),
    light_dir: Sequence[float] | None = None,
) -> RenderedView:
    """Render ``mesh`` seen by ``camera``.

    ``color``/``background`` are 0-255 RGB. ``light_dir`` points from the surface towards
    the light in world coordinates; by default the light comes from over the camera's upper
    left. Shading is ``ambient + (1 - ambient) * max(0, n . l)`` with ambient 0.3.
    """
    height, width = camera.height, camera.width
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if not np.isfinite(vertices).all():
        raise ValueError("mesh has non-finite vertex coordinates")
    light = _light_direction(camera, light_dir)

    rotation, translation = camera.world_to_camera[:3, :3], camera.world_to_camera[:3, 3]
    cam = vertices @ rotation.T + translation
    depth_v = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = camera.fx * cam[:, 0] / depth_v + camera.cx
        v = camera.fy * cam[:, 1] / depth_v + camera.cy
    screen = np.stack([u, v], axis=1)
    inv_z = np.where(depth_v > NEAR, 1.0 / np.where(depth_v > NEAR, depth_v, 1.0), 0.0)

    edge = _EdgeFunctions.build(screen, faces, depth_v)
    zbuffer = np.full(height * width, np.inf)
    owner = np.full(height * width, -1, dtype=np.int64)
    if edge is not None:
        _rasterise(edge, inv_z[faces], width, height, zbuffer, owner)

    mask_flat = owner >= 0
    pixels = np.flatnonzero(mask_flat)
    tri = owner[pixels]
    px = (pixels % width).astype(np.float64) + 0.5
    py = (pixels // width).astype(np.float64) + 0.5
    weights = edge.weights(tri, px, py) if edge is not None else np.zeros((0, 3))
    weights = weights * inv_z[faces[tri]]
    weights /= weights.sum(axis=1, keepdims=True)  # perspective-correct barycentrics

    corner_normals = _corner_normals(vertices, faces, camera.position)
    normals = np.einsum("nk,nkc->nc", weights, corner_normals[tri])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)

    bg = np.asarray(background, dtype=np.float64)
    shade = _AMBIENT + (1.0 - _AMBIENT) * np.clip(normals @ light, 0.0, None)
    rgb = np.tile(bg, (height * width, 1))
    rgb[pixels] = shade[:, None] * np.asarray(color, dtype=np.float64)
    normal_img = np.tile(bg, (height * width, 1))
    normal_img[pixels] = (normals * 0.5 + 0.5) * 255.0
    depth = zbuffer.astype(np.float32)
    depth[~mask_flat] = np.inf
    return RenderedView(
        rgb=_to_uint8(rgb).reshape(height, width, 3),
        normal=_to_uint8(normal_img).reshape(height, width, 3),
        mask=mask_flat.reshape(height, width),
        depth=depth.reshape(height, width),
    )


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _light_direction(camera: Camera, light_dir: Sequence[float] | None) -> np.ndarray:
    """Unit vector towards the light; default: from behind the camera, up and to the left."""
    if light_dir is None:
        right, down, forward = camera.world_to_camera[:3, :3]
        direction = -forward - 0.5 * down - 0.3 * right
    else:
        direction = np.asarray(light_dir, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(direction))
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"light_dir must be a non-zero finite 3-vector, got {light_dir}")
    return direction / norm


def _corner_normals(vertices: np.ndarray, faces: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """Per-corner unit normals ``(F, 3, 3)``, flipped on faces seen from behind."""
    corners = vertices[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    face_n = cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-300)
    vertex_n = np.zeros_like(vertices)
    for k in range(3):  # area-weighted vertex normals
        np.add.at(vertex_n, faces[:, k], cross)
    vertex_n /= np.maximum(np.linalg.norm(vertex_n, axis=1, keepdims=True), 1e-300)
    corner_n = vertex_n[faces]
    smooth = np.einsum("fkc,fc->fk", corner_n, face_n) >= math.cos(math.radians(CREASE_DEG))
    corner_n = np.where(smooth[..., None], corner_n, face_n[:, None, :])
    back = np.einsum("fc,fc->f", face_n, corners.mean(axis=1) - eye) > 0
    corner_n[back] *= -1.0
    return corner_n


@dataclass
class _EdgeFunctions:
    """Screen-space barycentric weights of the drawable triangles as linear functions.

    ``w_k(x, y) = a[t, k] * x + b[t, k] * y + c[t, k]``; ``ids`` maps rows to face indices
    and ``box`` holds the pixel bounding boxes ``(col0, row0, col1, row1)`` (inclusive).
    """

    ids: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    box: np.ndarray

    @classmethod
    def build(
        cls, screen: np.ndarray, faces: np.ndarray, depth: np.ndarray
    ) -> _EdgeFunctions | None:
        if len(faces) == 0:
            return None
        in_front = (depth[faces] > NEAR).all(axis=1)
        ids = np.flatnonzero(in_front)
        p = screen[faces[ids]]  # (T, 3, 2)
        x, y = p[..., 0], p[..., 1]
        area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (
            y[:, 1] - y[:, 0]
        )
        ok = np.abs(area2) > 1e-12
        ids, x, y, area2 = ids[ok], x[ok], y[ok], area2[ok]
        # w_k is the signed area of the sub-triangle opposite corner k over the full area
        i1, i2 = [1, 2, 0], [2, 0, 1]
        a = (y[:, i1] - y[:, i2]) / area2[:, None]
        b = (x[:, i2] - x[:, i1]) / area2[:, None]
        c = (x[:, i1] * y[:, i2] - x[:, i2] * y[:, i1]) / area2[:, None]
        # pixel centres (col + 0.5) inside [min, max]
        col0 = np.ceil(x.min(axis=1) - 0.5)
        col1 = np.floor(x.max(axis=1) - 0.5)
        row0 = np.ceil(y.min(axis=1) - 0.5)
        row1 = np.floor(y.max(axis=1) - 0.5)
        box = np.stack([col0, row0, col1, row1], axis=1)
        box = np.clip(box, -1, np.iinfo(np.int32).max).astype(np.int64)
        return cls(ids, a, b, c, box)

    def weights(self, rows: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Barycentric weights ``(N, 3)`` of points ``(px, py)`` in faces ``rows`` (face ids)."""
        index = np.searchsorted(self.ids, rows)
        return self.a[index] * px[:, None] + self.b[index] * py[:, None] + self.c[index]


def _rasterise(
    edge: _EdgeFunctions,
    inv_z: np.ndarray,
    width: int,
    height: int,
    zbuffer: np.ndarray,
    owner: np.ndarray,
) -> None:
    """Depth-test every covered pixel centre; fill ``zbuffer`` and ``owner`` (face ids)."""
    box = edge.box.copy()
    box[:, 0] = np.maximum(box[:, 0], 0)
    box[:, 1] = np.maximum(box[:, 1], 0)
    box[:, 2] = np.minimum(box[:, 2], width - 1)
    box[:, 3] = np.minimum(box[:, 3], height - 1)
    box_w = np.maximum(box[:, 2] - box[:, 0] + 1, 0)
    box_h = np.maximum(box[:, 3] - box[:, 1] + 1, 0)
    counts = box_w * box_h
    rows = np.flatnonzero(counts > 0)
    if len(rows) == 0:
        return
    inv_z = inv_z[edge.ids]
    ends = np.cumsum(counts[rows])
    start = 0
    while start < len(rows):
        # as many triangles as fit in the fragment budget (at least one)
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + _CHUNK_FRAGMENTS, side="right")), start + 1)
        chunk = rows[start:stop]
        n = counts[chunk]
        frag_tri = np.repeat(chunk, n)
        offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        col = box[frag_tri, 0] + offsets % box_w[frag_tri]
        row = box[frag_tri, 1] + offsets // box_w[frag_tri]
        px, py = col + 0.5, row + 0.5
        w = edge.a[frag_tri] * px[:, None] + edge.b[frag_tri] * py[:, None] + edge.c[frag_tri]
        inside = (w >= -1e-9).all(axis=1)
        frag_tri, w = frag_tri[inside], w[inside]
        pixel = (row * width + col)[inside]
        depth = 1.0 / np.einsum("nk,nk->n", w, inv_z[frag_tri])
        np.minimum.at(zbuffer, pixel, depth)
        win = depth <= zbuffer[pixel]
        owner[pixel[win]] = edge.ids[frag_tri[win]]
        start = stop

"""The numpy z-buffer renderer against analytic projections, occlusion and normals."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import trimesh

from genlab.data.cameras import look_at_camera
from genlab.geometry.rasterize import RenderedView, render_view


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=4, radius=1.0)  # 5120 faces


def decode(normal: np.ndarray) -> np.ndarray:
    return normal.astype(np.float64) / 255.0 * 2.0 - 1.0


def test_sphere_disc_depth_and_normals(sphere: trimesh.Trimesh) -> None:
    distance, size = 4.0, 256
    cam = look_at_camera(20, 30, distance, fov_deg=40, width=size, height=size)
    view = render_view(sphere, cam)
    assert view.rgb.shape == (size, size, 3) and view.rgb.dtype == np.uint8
    assert view.normal.shape == (size, size, 3) and view.normal.dtype == np.uint8
    assert view.mask.shape == (size, size) and view.mask.dtype == bool
    assert view.depth.shape == (size, size) and view.depth.dtype == np.float32
    # the silhouette cone has half-angle asin(r / d): radius f * r / sqrt(d^2 - r^2) pixels
    expected_radius = cam.fy / math.sqrt(distance**2 - 1.0)
    assert math.sqrt(view.mask.sum() / math.pi) == pytest.approx(expected_radius, abs=1.0)
    rows, cols = np.nonzero(view.mask)
    assert cols.mean() + 0.5 == pytest.approx(cam.cx, abs=0.5)
    assert rows.mean() + 0.5 == pytest.approx(cam.cy, abs=0.5)
    assert (cols.max() - cols.min() + 1) / 2 == pytest.approx(expected_radius, abs=1.5)
    # the pixel at the image centre sees the nearest point of the sphere, facing the camera
    assert view.depth[128, 128] == pytest.approx(distance - 1.0, abs=2e-3)
    centre_normal = decode(view.normal[128, 128])
    assert centre_normal @ (cam.position / distance) > 0.995
    assert np.isinf(view.depth[~view.mask]).all() and np.isfinite(view.depth[view.mask]).all()
    assert (view.rgb[~view.mask] == 255).all() and (view.normal[~view.mask] == 255).all()


def test_smooth_normals_match_the_analytic_sphere(sphere: trimesh.Trimesh) -> None:
    cam = look_at_camera(-15, 200, 3.0, fov_deg=45, width=128, height=128)
    view = render_view(sphere, cam)
    rows, cols = np.nonzero(view.mask)
    # ray through each pixel centre, intersected with the unit sphere
    rays_cam = np.stack(
        [(cols + 0.5 - cam.cx) / cam.fx, (rows + 0.5 - cam.cy) / cam.fy, np.ones(len(rows))], 1
    )
    rays = rays_cam @ cam.world_to_camera[:3, :3]  # to world (R^T applied to each row)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    origin = cam.position
    b = rays @ origin
    t = -b - np.sqrt(np.maximum(b**2 - (origin @ origin - 1.0), 0.0))
    hit = origin + t[:, None] * rays
    normals = decode(view.normal[rows, cols])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)  # undo the 8-bit rounding
    angle = np.degrees(np.arccos(np.clip(np.einsum("nc,nc->n", normals, hit), -1, 1)))
    # interpolated vertex normals: well below the ~4 degrees between neighbouring faces
    assert np.median(angle) < 0.5 and np.percentile(angle, 99) < 1.0
    # depth is the camera z of the surface point
    z = (hit @ cam.world_to_camera[:3, :3].T + cam.world_to_camera[:3, 3])[:, 2]
    assert np.median(np.abs(view.depth[rows, cols] - z)) < 2e-3


def test_cube_face_on_is_a_square() -> None:
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cam = look_at_camera(0, 0, 3.0, fov_deg=30, width=101, height=101)
    view = render_view(cube, cam, color=(200, 100, 50), light_dir=(1, 0, 0))
    # the face x = 0.5 is 2.5 in front of the camera: half side f * 0.5 / 2.5 pixels
    half = cam.fx * 0.5 / 2.5
    centres = np.arange(101) + 0.5
    inside = np.abs(centres - cam.cx) <= half
    np.testing.assert_array_equal(view.mask, inside[:, None] & inside[None, :])
    assert view.depth[view.mask] == pytest.approx(2.5, abs=1e-5)
    np.testing.assert_array_equal(view.normal[view.mask], [[255, 128, 128]] * view.mask.sum())
    np.testing.assert_array_equal(view.rgb[view.mask], [[200, 100, 50]] * view.mask.sum())
    rgba = view.rgba()
    assert rgba.shape == (101, 101, 4)
    np.testing.assert_array_equal(rgba[..., 3], view.mask * 255)
    np.testing.assert_array_equal(view.normal_rgba()[..., :3], view.normal)


@pytest.mark.parametrize("near_first", [True, False])
def test_occlusion_order(near_first: bool) -> None:
    near = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    near.apply_translation((1.0, 0.0, 0.0))
    far = trimesh.creation.box(extents=(1.5, 1.5, 1.5))
    far.apply_translation((-1.0, 0.0, 0.0))
    parts = [near, far] if near_first else [far, near]
    cam = look_at_camera(0, 0, 5.0, fov_deg=30, width=96, height=96)
    view = render_view(trimesh.util.concatenate(parts), cam)
    assert view.depth[48, 48] == pytest.approx(5.0 - 1.25, abs=1e-5)  # the near box in front
    assert view.depth[48, 30] == pytest.approx(5.0 - (-1.0 + 0.75), abs=1e-5)  # far box beside
    np.testing.assert_array_equal(decode(view.normal[48, 48]).round(), [1, 0, 0])
    assert set(np.unique(view.depth[view.mask]).round(4)) == {3.75, 5.25}


def test_open_mesh_normals_face_the_camera() -> None:
    # a square in the plane x = 0 wound so that its normal is -x, seen from +x
    square = trimesh.Trimesh(
        vertices=[[0, -1, -1], [0, 1, -1], [0, 1, 1], [0, -1, 1]],
        faces=[[0, 2, 1], [0, 3, 2]],
        process=False,
    )
    assert square.face_normals[0] @ [1, 0, 0] < 0
    view = render_view(square, look_at_camera(0, 0, 3.0, width=48, height=48))
    assert view.mask.sum() > 100
    np.testing.assert_array_equal(np.unique(view.normal[view.mask], axis=0), [[255, 128, 128]])


def test_geometry_behind_the_camera_is_not_drawn(sphere: trimesh.Trimesh) -> None:
    cam = look_at_camera(0, 0, 3.0, width=64, height=64)
    behind = sphere.copy()
    behind.apply_translation((6.0, 0.0, 0.0))  # on the far side of the camera
    view = render_view(behind, cam, background=(10, 20, 30))
    assert not view.mask.any() and np.isinf(view.depth).all()
    np.testing.assert_array_equal(np.unique(view.rgb.reshape(-1, 3), axis=0), [[10, 20, 30]])
    # a mesh straddling the camera plane: only its triangles fully in front are drawn
    straddling = sphere.copy()
    straddling.apply_translation((3.0, 0.0, 0.0))
    partial = render_view(straddling, cam)
    assert np.isfinite(partial.depth[partial.mask]).all()
    assert (partial.depth[partial.mask] > 0).all()


def test_empty_mesh_and_bad_light() -> None:
    cam = look_at_camera(0, 0, 2.0, width=16, height=16)
    empty = render_view(trimesh.Trimesh(), cam)
    assert isinstance(empty, RenderedView) and not empty.mask.any()
    with pytest.raises(ValueError, match="light_dir must be a non-zero finite 3-vector"):
        render_view(trimesh.creation.box(), cam, light_dir=(0, 0, 0))


def test_lambert_shading_follows_the_light(sphere: trimesh.Trimesh) -> None:
    cam = look_at_camera(0, 0, 4.0, width=64, height=64)
    view = render_view(sphere, cam, color=(255, 255, 255), light_dir=(0, 0, 1))
    rows, cols = np.nonzero(view.mask)
    top, bottom = rows < 32, rows >= 32
    # the light is above: the top half is brighter, the unlit bottom gets only the ambient 0.3
    assert (
        view.rgb[rows[top], cols[top], 0].mean()
        > view.rgb[rows[bottom], cols[bottom], 0].mean() + 50
    )
    assert view.rgb[view.mask].min() == round(0.3 * 255)


def test_speed(sphere: trimesh.Trimesh) -> None:
    cam = look_at_camera(20, 30, 2.5, width=256, height=256)
    render_view(sphere, cam)
    start = time.perf_counter()
    render_view(sphere, cam)
    assert time.perf_counter() - start < 0.5

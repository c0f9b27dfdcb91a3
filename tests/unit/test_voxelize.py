"""Voxelisation on the unit-cube grid: convention, accuracy, clipping, filling, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

from genlab.data.meshes import load_mesh, normalize_to_unit_cube
from genlab.geometry.voxelize import (
    fill_holes,
    index_to_world,
    sample_triangles,
    voxel_centers,
    voxelize_mesh,
    world_to_index,
)


@pytest.fixture(scope="module")
def unit_sphere(shared_testdata: Path) -> trimesh.Trimesh:
    path = shared_testdata / "trimesh" / "sphere.ply"
    if not path.is_file():
        pytest.skip(f"sphere mesh not present: {path}")
    return normalize_to_unit_cube(load_mesh(path))


def _radii(mesh: trimesh.Trimesh) -> tuple[float, float]:
    """(inscribed, circumscribed) radius of a convex mesh centred at the origin."""
    r_out = float(np.linalg.norm(mesh.vertices, axis=1).max())
    r_in = float(np.abs(np.einsum("fi,fi->f", mesh.face_normals, mesh.triangles[:, 0])).min())
    return r_in, r_out


# ------------------------------------------------------------------------------ grid convention


def test_voxel_centers_follow_the_convention() -> None:
    centers = voxel_centers(4)
    assert centers.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(centers[0, 0, 0], [-0.375, -0.375, -0.375])
    np.testing.assert_allclose(centers[3, 1, 2], [0.375, -0.125, 0.125])  # (i, j, k) -> (x, y, z)
    np.testing.assert_allclose(index_to_world(np.array([[0.0, 1.0, 2.0]]), 4), centers[:1, 1, 2])
    np.testing.assert_allclose(index_to_world([-0.5, 3.5, 1.5], 4), [-0.5, 0.5, 0.0])
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (10, 3))
    np.testing.assert_allclose(index_to_world(world_to_index(points, 16), 16), points)


def test_axis_order_and_extent_of_an_offset_box() -> None:
    box = trimesh.creation.box(bounds=[[0.11, -0.19, -0.04], [0.29, 0.19, 0.04]])
    grid = voxelize_mesh(box, 20)
    expected = np.zeros((20, 20, 20), dtype=bool)
    expected[12:16, 6:14, 9:11] = True  # x 12.2..15.8, y 6.2..13.8, z 9.2..10.8 in grid units
    np.testing.assert_array_equal(grid, expected)


def test_full_unit_cube_fills_the_grid() -> None:
    grid = voxelize_mesh(trimesh.creation.box(extents=(1.0, 1.0, 1.0)), 16)
    assert grid.all()


# ------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize(("resolution", "max_excess"), [(32, 0.16), (64, 0.08)])
def test_sphere_is_solid_and_matches_geometry(
    unit_sphere: trimesh.Trimesh, resolution: int, max_excess: float
) -> None:
    grid = voxelize_mesh(unit_sphere, resolution)
    assert grid.shape == (resolution,) * 3 and grid.dtype == bool
    half = resolution // 2
    assert grid[half, half, half] and grid[half - 1, half - 1, half - 1]

    r_in, r_out = _radii(unit_sphere)
    centers = voxel_centers(resolution)
    # every voxel whose centre is inside the polyhedron is filled ...
    assert grid[np.linalg.norm(centers, axis=-1) < r_in].all()
    # ... and nothing is filled that does not touch the circumscribed ball
    nearest = np.clip(np.abs(centers) - 0.5 / resolution, 0.0, None)
    assert not grid[np.linalg.norm(nearest, axis=-1) > r_out].any()

    # the filled volume is the mesh volume plus about half a shell of surface voxels
    ratio = grid.mean() / unit_sphere.volume
    assert 1.0 < ratio < 1.0 + max_excess, ratio
    assert unit_sphere.volume / (4 / 3 * np.pi * 0.5**3) == pytest.approx(1.0, abs=0.01)


def test_surface_voxels_near_the_surface_are_never_missed() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.37)
    resolution = 48
    shell = voxelize_mesh(sphere, resolution, fill=False)
    distance = np.abs(np.linalg.norm(voxel_centers(resolution), axis=-1) - 0.37)
    assert shell[distance < 0.3 / resolution].all()  # the surface runs through these voxels
    assert not shell[distance > 0.9 / resolution].any()  # these it cannot touch
    assert not shell[24, 24, 24]  # hollow without fill


def test_enclosed_cavity_is_filled() -> None:
    outer = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    inner = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    inner.invert()
    hollow = trimesh.util.concatenate([outer, inner])
    shell = voxelize_mesh(hollow, 32, fill=False)
    solid = voxelize_mesh(hollow, 32, fill=True)
    assert not shell[16, 16, 16] and solid[16, 16, 16]
    np.testing.assert_array_equal(solid, ndimage.binary_fill_holes(shell))


def test_parts_outside_the_cube_are_clipped_not_clamped() -> None:
    box = trimesh.creation.box(bounds=[[0.21, -0.19, -0.19], [0.8, 0.19, 0.19]])
    grid = voxelize_mesh(box, 20, fill=False)
    last = grid[19]
    # side faces cross the last slab (ring), the far face at x=0.8 does not come back as a wall
    assert last[6, 10] and last[13, 10] and last[10, 6] and last[10, 13]
    assert not last[8:12, 8:12].any()
    assert grid[14, 8:12, 8:12].all()  # the face at x=0.21 (grid x = 14.2)


def test_empty_mesh_and_bad_resolution() -> None:
    empty = voxelize_mesh(trimesh.Trimesh(), 8)
    assert empty.shape == (8, 8, 8) and not empty.any()
    with pytest.raises(ValueError, match="resolution"):
        voxelize_mesh(trimesh.creation.box(), 0)
    with pytest.raises(ValueError, match="resolution"):
        voxel_centers(2.5)  # type: ignore[arg-type]


def test_fill_holes_matches_scipy_on_noise() -> None:
    rng = np.random.default_rng(1)
    for density in (0.3, 0.6, 0.8):
        grid = rng.random((24, 20, 16)) < density
        np.testing.assert_array_equal(fill_holes(grid), ndimage.binary_fill_holes(grid))
    assert fill_holes(np.ones((4, 4, 4), dtype=bool)).all()


# ------------------------------------------------------------------------------------- sampling


def test_sampling_covers_triangles_and_slivers_stay_cheap() -> None:
    rng = np.random.default_rng(0)
    spacing = 0.5
    for _ in range(20):
        tri = rng.normal(size=(1, 3, 3)) * rng.uniform(0.5, 4.0)
        points = sample_triangles(tri, spacing)
        u, v = rng.random((2, 500))
        flip = u + v > 1
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        query = (
            tri[0, 0] + u[:, None] * (tri[0, 1] - tri[0, 0]) + v[:, None] * (tri[0, 2] - tri[0, 0])
        )
        gap, _ = cKDTree(points).query(query)
        assert gap.max() <= 1.12 * spacing
    sliver = np.array([[[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [50.0, 0.01, 0.0]]])
    assert len(sample_triangles(sliver, spacing)) < 3 * 100 / spacing  # not (100/0.5)^2


def test_voxelize_4k_faces_at_64_is_fast(shared_testdata: Path) -> None:
    path = shared_testdata / "trimesh" / "ballA.off"
    if not path.is_file():
        pytest.skip(f"ballA.off not present: {path}")
    mesh = normalize_to_unit_cube(load_mesh(path), margin=0.02)
    assert len(mesh.faces) == 3796
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        grid = voxelize_mesh(mesh, 64)
        timings.append(time.perf_counter() - start)
    assert 0.3 < grid.mean() < 0.6
    assert min(timings) < 0.25, timings  # typically ~15 ms; generous for loaded CI machines

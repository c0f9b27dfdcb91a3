"""Marching cubes: pytorch3d reference, world coordinates, orientation, level fallback."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree
from skimage.draw import ellipsoid

from genlab.geometry.marching_cubes import (
    IsoLevelWarning,
    MeshExtractor,
    extract_mesh,
    marching_cubes_index_space,
)
from genlab.geometry.voxelize import voxel_centers


@pytest.fixture
def mc_reference(shared_testdata: Path) -> Path:
    folder = shared_testdata / "pytorch3d" / "marching_cubes_ref"
    if not folder.is_dir():
        pytest.skip(f"pytorch3d marching-cubes references not present: {folder}")
    return folder


def _sorted_rows(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    key = np.round(points, 3)
    return points[np.lexsort(key.T[::-1])]


def _assert_same_surface(verts, faces, ref_verts, ref_faces) -> None:
    assert verts.shape == ref_verts.shape
    assert faces.shape == ref_faces.shape
    np.testing.assert_allclose(_sorted_rows(verts), _sorted_rows(ref_verts), atol=1e-4)
    distance, match = cKDTree(verts).query(ref_verts)
    assert distance.max() < 1e-4 and len(np.unique(match)) == len(verts)  # one-to-one
    mine = trimesh.Trimesh(verts, faces, process=False)
    theirs = trimesh.Trimesh(ref_verts, ref_faces, process=False)
    assert mine.area == pytest.approx(theirs.area, rel=1e-6)
    assert mine.is_watertight and theirs.is_watertight
    assert abs(mine.volume) == pytest.approx(abs(theirs.volume), rel=1e-6)


def test_sphere_level64_matches_pytorch3d(mc_reference: Path) -> None:
    # pytorch3d's test_sphere: volume[x, y, z] = squared distance to (10, 10, 10), isolevel 64
    ref = np.load(mc_reference / "sphere_level64.npz")
    x = np.arange(20, dtype=np.float32)
    gx, gy, gz = np.meshgrid(x, x, x, indexing="ij")
    volume = (gx - 10) ** 2 + (gy - 10) ** 2 + (gz - 10) ** 2
    verts, faces = marching_cubes_index_space(volume, 64.0)
    _assert_same_surface(verts, faces, ref["verts"], ref["faces"])
    assert trimesh.Trimesh(verts, faces, process=False).area == pytest.approx(799.0093, rel=1e-6)


def test_double_ellipsoid_matches_pytorch3d(mc_reference: Path) -> None:
    # pytorch3d's test_double_ellipsoid: two skimage ellipsoids, isolevel 0.001; the reference
    # vertices are in pytorch3d's local coordinates [-1, 1] per axis
    ref = np.load(mc_reference / "double_ellipsoid.npz")
    base = ellipsoid(6, 10, 16, levelset=True)
    volume = np.concatenate((base[:-1], base[2:]), axis=0).astype(np.float32)
    verts, faces = marching_cubes_index_space(volume, 0.001)
    dims = np.array(volume.shape, dtype=np.float64)
    ref_verts = (ref["verts"].astype(np.float64) + 1.0) * (dims - 1.0) / 2.0
    _assert_same_surface(verts, faces, ref_verts, ref["faces"])


def test_padding_keeps_index_space() -> None:
    grid = np.zeros((6, 6, 6), dtype=np.float32)
    grid[2:4, 2:4, 2:4] = 1.0
    plain = marching_cubes_index_space(grid, 0.5)
    padded = marching_cubes_index_space(grid, 0.5, pad=True)
    np.testing.assert_allclose(_sorted_rows(plain[0]), _sorted_rows(padded[0]))


# ---------------------------------------------------------------------------- extract_mesh


def _ball(resolution: int, radius: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    distance = np.linalg.norm(voxel_centers(resolution) - np.asarray(center), axis=-1)
    return (distance < radius).astype(np.float32)


def test_sphere_is_closed_outward_and_in_world_units() -> None:
    center = np.array([0.1, -0.05, 0.0])
    mesh = extract_mesh(_ball(32, 0.3, center))
    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.03)
    outward = np.einsum("fi,fi->f", mesh.face_normals, mesh.triangles_center - center)
    assert (outward > 0).all()
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), center, atol=0.02)


def test_axes_map_to_x_y_z() -> None:
    grid = np.zeros((32, 32, 32), dtype=np.float32)
    grid[4:28, 12:20, 14:18] = 1.0  # long in x, medium in y, thin in z
    mesh = extract_mesh(grid)
    # level 0.5 lies halfway between the last filled and first empty voxel centres
    np.testing.assert_allclose(mesh.bounds, [[-0.375, -0.125, -0.0625], [0.375, 0.125, 0.0625]])


def test_shape_touching_the_border_is_closed() -> None:
    grid = np.ones((8, 8, 8), dtype=np.float32)
    grid[0] = 0.0
    mesh = extract_mesh(grid)
    assert mesh.is_watertight and mesh.volume > 0
    np.testing.assert_allclose(mesh.bounds, [[-0.375, -0.5, -0.5], [0.5, 0.5, 0.5]])


def test_smoothing_and_torch_input() -> None:
    grid = _ball(32, 0.3)
    sharp = extract_mesh(torch.from_numpy(grid))
    smooth = extract_mesh(torch.from_numpy(grid).to(torch.float64), sigma=1.0)
    assert smooth.is_watertight and sharp.is_watertight
    # smoothing rounds off voxel steps: less area for about the same volume
    assert smooth.area < sharp.area
    assert smooth.volume == pytest.approx(sharp.volume, rel=0.05)
    boolean = extract_mesh(torch.from_numpy(grid > 0.5))
    assert boolean.volume == pytest.approx(sharp.volume)
    assert MeshExtractor(level=0.5, sigma=1.0)(grid).volume == pytest.approx(smooth.volume)


def test_level_outside_range_warns_and_uses_midpoint() -> None:
    grid = _ball(16, 0.3) * 0.4  # values in [0, 0.4]
    with pytest.warns(IsoLevelWarning, match=r"iso-level 0\.5 .*\[0, 0\.4\].*midpoint 0\.2"):
        mesh = extract_mesh(grid, level=0.5)
    assert mesh is not None and mesh.is_watertight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = extract_mesh(grid, level=0.2)
    np.testing.assert_allclose(mesh.vertices, expected.vertices)


def test_level_outside_smoothed_range_warns() -> None:
    grid = np.zeros((16, 16, 16), dtype=np.float32)
    grid[8, 8, 8] = 1.0  # a single voxel: after smoothing the peak is far below 0.5
    with pytest.warns(IsoLevelWarning, match=r"iso-level 0\.5 is outside"):
        mesh = extract_mesh(grid, level=0.5, sigma=2.0)
    assert mesh is not None and len(mesh.faces) > 0


def test_constant_volume_warns_and_returns_none() -> None:
    with pytest.warns(IsoLevelWarning, match=r"iso-level 0\.5 .*\[0, 0\].*constant"):
        assert extract_mesh(np.zeros((8, 8, 8))) is None
    with pytest.warns(IsoLevelWarning, match=r"\[1, 1\]"):
        assert extract_mesh(torch.ones(8, 8, 8)) is None


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8, 8), (2, 4, 4, 4, 4)])
def test_wrong_ndim_names_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        extract_mesh(np.zeros(shape))


def test_non_finite_values_and_negative_sigma_rejected() -> None:
    grid = _ball(8, 0.3)
    grid[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        extract_mesh(grid)
    with pytest.raises(ValueError, match="sigma"):
        extract_mesh(_ball(8, 0.3), sigma=-1.0)


def test_extract_64_is_fast() -> None:
    grid = _ball(64, 0.4)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        mesh = extract_mesh(grid, sigma=0.5)
        timings.append(time.perf_counter() - start)
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.4**3, rel=0.02)
    assert min(timings) < 0.5, timings

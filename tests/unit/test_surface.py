"""Area-weighted surface sampling."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from genlab.geometry.surface import sample_surface


def test_sphere_points_and_normals() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=2.0)
    points, normals = sample_surface(sphere, 5000, seed=3)
    assert points.shape == normals.shape == (5000, 3)
    assert points.dtype == normals.dtype == np.float32
    radius = np.linalg.norm(points, axis=1)
    assert radius.max() <= 2.0 + 1e-5 and radius.min() > 2.0 * 0.998  # on the faceted surface
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    radial = points / radius[:, None]
    assert np.einsum("nc,nc->n", normals, radial).min() > 0.998
    # uniform over the sphere: the centroid is near the centre, each octant gets ~1/8
    assert np.abs(points.mean(axis=0)).max() < 0.1
    octant = (points > 0) @ [1, 2, 4]
    assert np.abs(np.bincount(octant, minlength=8) / 5000 - 1 / 8).max() < 0.03


def test_area_weighting() -> None:
    # a 1x1 square at z = 0 and a sqrt(3) x sqrt(3) square (area 3) at z = 1
    s = np.sqrt(3.0)
    vertices = [
        [0, 0, 0],
        [1, 0, 0],
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 1],
        [s, 0, 1],
        [s, s, 1],
        [0, s, 1],
    ]
    faces = [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]]
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    points, normals = sample_surface(mesh, 20000, seed=0)
    on_big = points[:, 2] > 0.5
    assert on_big.mean() == pytest.approx(0.75, abs=0.015)
    np.testing.assert_allclose(normals, np.tile([0, 0, 1], (20000, 1)), atol=1e-6)
    # uniform inside each square: the mean is its centre
    np.testing.assert_allclose(points[on_big, :2].mean(axis=0), [s / 2, s / 2], atol=0.03)
    np.testing.assert_allclose(points[~on_big, :2].mean(axis=0), [0.5, 0.5], atol=0.03)


def test_deterministic_by_seed() -> None:
    box = trimesh.creation.box()
    a = sample_surface(box, 100, seed=7)
    b = sample_surface(box, 100, seed=7)
    c = sample_surface(box, 100, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert sample_surface(box, 0)[0].shape == (0, 3)


def test_degenerate_faces_are_never_picked() -> None:
    vertices = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 2], [3, 3, 3], [4, 4, 4]]
    mesh = trimesh.Trimesh(
        vertices=vertices, faces=[[3, 4, 5], [0, 1, 2], [3, 4, 5]], process=False
    )
    points, normals = sample_surface(mesh, 500)
    assert np.abs(points[:, 2]).max() == 0.0
    assert (points[:, 0] + points[:, 1] <= 1 + 1e-6).all()
    np.testing.assert_allclose(normals, np.tile([0, 0, 1], (500, 1)))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"^cannot sample the surface of a mesh with no faces$"):
        sample_surface(trimesh.Trimesh(vertices=[[0, 0, 0]], faces=np.zeros((0, 3), int)), 10)
    flat = trimesh.Trimesh(
        vertices=[[0, 0, 0], [1, 1, 1], [2, 2, 2]], faces=[[0, 1, 2]], process=False
    )
    with pytest.raises(
        ValueError, match=r"^cannot sample the surface of a mesh with zero area \(1 faces\)$"
    ):
        sample_surface(flat, 10)
    with pytest.raises(ValueError, match="count must be non-negative, got -1"):
        sample_surface(trimesh.creation.box(), -1)

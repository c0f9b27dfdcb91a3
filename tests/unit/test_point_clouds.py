"""Point-cloud reading (.npy layouts, PLY/XYZ via trimesh, errors) and resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from genlab.data.point_clouds import (
    PointCloudReadError,
    farthest_point_indices,
    read_point_cloud,
    resample,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def pcu_data(shared_testdata: Path) -> Path:
    return shared_path(shared_testdata, "point_cloud_utils")


@pytest.fixture(scope="module")
def trimesh_data(shared_testdata: Path) -> Path:
    return shared_path(shared_testdata, "trimesh")


@pytest.fixture(scope="module")
def vertices(pcu_data: Path) -> np.ndarray:
    return np.load(pcu_data / "1_vertices.npy")


def save(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


# ------------------------------------------------------------------------------------- .npy


def test_real_npy_points(pcu_data: Path, vertices: np.ndarray) -> None:
    points, colors = read_point_cloud(pcu_data / "1_vertices.npy")
    assert points.shape == (17305, 3) and points.dtype == np.float32
    assert colors is None
    np.testing.assert_allclose(points, vertices, rtol=1e-6)
    assert points.min() > 280 and points.max() < 2130  # kept as stored, not normalised


def test_fortran_order_npy(pcu_data: Path) -> None:
    points, _ = read_point_cloud(pcu_data / "1_vertex_normals.npy")
    np.testing.assert_allclose(points, np.load(pcu_data / "1_vertex_normals.npy"), rtol=1e-6)


def test_transposed_npy_is_detected(tmp_path: Path, vertices: np.ndarray) -> None:
    points, _ = read_point_cloud(save(tmp_path, "cols.npy", vertices.T))
    np.testing.assert_allclose(points, vertices, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 3), (6, 6), (3, 6)])
def test_ambiguous_shape_is_an_error(tmp_path: Path, shape: tuple[int, int]) -> None:
    path = save(tmp_path, "tiny.npy", np.zeros(shape))
    with pytest.raises(PointCloudReadError, match=r"tiny\.npy: ambiguous shape"):
        read_point_cloud(path)


def test_xyz_rgb_npy_with_0_255_colours(pcu_data: Path, tmp_path: Path) -> None:
    xyz = np.load(pcu_data / "1_vertices.npy")
    rgb = np.load(pcu_data / "1_vertex_colors.npy")[:, :3]
    for name, array in [
        ("float.npy", np.hstack([xyz, rgb.astype(np.float64)])),
        ("int.npy", np.hstack([xyz.astype(np.int64), rgb.astype(np.int64)])),
    ]:
        points, colors = read_point_cloud(save(tmp_path, name, array))
        assert colors is not None and colors.dtype == np.float32 and colors.shape == (17305, 3)
        np.testing.assert_allclose(colors, rgb / 255.0, atol=1e-6)
        assert points.shape == (17305, 3)


def test_xyz_rgb_npy_with_0_1_colours(tmp_path: Path) -> None:
    array = np.random.default_rng(0).random((50, 6))
    _, colors = read_point_cloud(save(tmp_path, "unit.npy", array))
    np.testing.assert_allclose(colors, array[:, 3:], rtol=1e-6)
    array[0, 3] = 300.0
    with pytest.raises(PointCloudReadError, match=r"colour values must be in \[0, 1\] or"):
        read_point_cloud(save(tmp_path, "bad.npy", array))


def test_wrong_shapes_are_named(pcu_data: Path, tmp_path: Path) -> None:
    with pytest.raises(PointCloudReadError, match=r"1_vertex_colors\.npy: .*shape \(17305, 4\)"):
        read_point_cloud(pcu_data / "1_vertex_colors.npy")
    with pytest.raises(PointCloudReadError, match=r"3-D shape \(2, 5, 3\)"):
        read_point_cloud(save(tmp_path, "cube.npy", np.zeros((2, 5, 3))))
    with pytest.raises(PointCloudReadError, match=r"empty point cloud \(0 points\)"):
        read_point_cloud(save(tmp_path, "empty.npy", np.zeros((0, 3))))


def test_nan_points_are_counted(tmp_path: Path) -> None:
    array = np.random.default_rng(0).random((100, 3))
    array[[3, 50], 1] = np.nan
    array[7, 0] = np.inf
    with pytest.raises(PointCloudReadError, match="nans.npy: 3 of 100 points have non-finite"):
        read_point_cloud(save(tmp_path, "nans.npy", array))


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(PointCloudReadError, match="junk.npy: cannot read .npy"):
        read_point_cloud(tmp_path / "junk.npy")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PointCloudReadError, match="objects.npy: cannot read .npy"):
        read_point_cloud(pickled)
    with pytest.raises(PointCloudReadError, match="missing.npy: file not found"):
        read_point_cloud(tmp_path / "missing.npy")
    with pytest.raises(PointCloudReadError, match="unsupported point-cloud extension '.obj'"):
        read_point_cloud(tmp_path / "mesh.obj")


# ------------------------------------------------------------------------ PLY / XYZ / TXT


def test_point_only_ply_ascii_and_binary(trimesh_data: Path) -> None:
    ascii_points, colors = read_point_cloud(trimesh_data / "points_ascii.ply")
    binary_points, _ = read_point_cloud(trimesh_data / "points_bin.ply")  # element face 0
    assert ascii_points.shape == (5, 3) and colors is None
    np.testing.assert_allclose(ascii_points, binary_points)
    with_lists, _ = read_point_cloud(trimesh_data / "points_ascii_with_lists.ply")
    np.testing.assert_allclose(with_lists, ascii_points)
    assert read_point_cloud(trimesh_data / "points_emptyface.ply")[0].shape == (1024, 3)
    assert read_point_cloud(trimesh_data / "emptyIO_ply_points_bin.ply")[0].shape == (8, 3)


def test_double_precision_ply_with_normals(pcu_data: Path) -> None:
    points, _ = read_point_cloud(pcu_data / "duplicated_pcloud.ply")
    assert points.shape == (5395, 3) and points.dtype == np.float32


@pytest.mark.parametrize("name", ["empty.ply", "emptyIO_ply_empty_bin.ply"])
def test_empty_ply_is_an_error(trimesh_data: Path, name: str) -> None:
    with pytest.raises(PointCloudReadError, match=f"{name}: empty point cloud"):
        read_point_cloud(trimesh_data / name)


def test_xyz_with_colours(trimesh_data: Path) -> None:
    points, colors = read_point_cloud(trimesh_data / "points_cloudcompare.xyz")
    assert points.shape == (101, 3) and colors is not None and colors.shape == (101, 3)
    assert colors.min() >= 0.0 and colors.max() <= 1.0
    np.testing.assert_allclose(colors[0], np.array([117, 73, 49]) / 255.0, atol=1e-6)
    assert points[:, 0].min() > 665_000  # UTM coordinates, kept as stored


def test_txt_points(tmp_path: Path) -> None:
    (tmp_path / "cloud.txt").write_text("0 0 0\n1 2 3\n4 5 6\n7 8 9\n")
    points, colors = read_point_cloud(tmp_path / "cloud.txt")
    assert points.tolist()[1] == [1, 2, 3] and colors is None
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(PointCloudReadError, match="blank.txt: empty point cloud"):
        read_point_cloud(tmp_path / "blank.txt")
    (tmp_path / "two.txt").write_text("1 2\n3 4\n")
    with pytest.raises(PointCloudReadError, match="two.txt: cannot read point cloud"):
        read_point_cloud(tmp_path / "two.txt")
    (tmp_path / "nan.txt").write_text("1 2 3\nnan 1 1\n")
    with pytest.raises(PointCloudReadError, match="1 of 2 points have non-finite"):
        read_point_cloud(tmp_path / "nan.txt")


# ------------------------------------------------------------------------------- resampling


def coverage(points: np.ndarray, sample: np.ndarray) -> float:
    """Largest distance from any point to its nearest sample point."""
    return float(cKDTree(sample).query(points)[0].max())


def test_fps_gives_distinct_points_covering_better_than_random(vertices: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    fps, _ = resample(vertices, 256, "fps", rng=rng)
    rand, _ = resample(vertices, 256, "random", rng=rng)
    assert fps.shape == (256, 3) and fps.dtype == vertices.dtype
    assert len(np.unique(fps, axis=0)) == 256
    assert len(np.unique(rand, axis=0)) == 256
    assert coverage(vertices, fps) < 0.7 * coverage(vertices, rand)


def test_fps_order_on_a_line() -> None:
    line = np.stack([np.arange(11.0), np.zeros(11), np.zeros(11)], axis=1)
    assert farthest_point_indices(line, 3, start=0).tolist() == [0, 10, 5]
    with pytest.raises(ValueError, match="cannot pick 12 of 11"):
        farthest_point_indices(line, 12)


def test_fps_max_input_presamples(vertices: np.ndarray) -> None:
    points, _ = resample(vertices, 64, "fps", rng=np.random.default_rng(1), fps_max_input=512)
    assert len(np.unique(points, axis=0)) == 64
    with pytest.raises(ValueError, match="at least n"):
        resample(vertices, 64, fps_max_input=10)


def test_resample_is_reproducible_and_carries_colours() -> None:
    rng = np.random.default_rng(0)
    points, colors = rng.random((1000, 3)), rng.random((1000, 3))
    for method in ("fps", "random"):
        a = resample(points, 100, method, np.random.default_rng(5), colors)
        b = resample(points, 100, method, np.random.default_rng(5), colors)
        np.testing.assert_array_equal(a[0], b[0])
        index = [int(np.flatnonzero((points == p).all(axis=1))[0]) for p in a[0]]
        np.testing.assert_array_equal(a[1], colors[index])


def test_fewer_points_than_requested_keeps_all_and_repeats() -> None:
    points = np.random.default_rng(0).random((10, 3))
    for method in ("fps", "random"):
        out, colors = resample(points, 25, method, np.random.default_rng(0))
        assert out.shape == (25, 3) and colors is None
        assert len(np.unique(out, axis=0)) == 10


def test_resample_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        resample(np.zeros((0, 3)), 4)
    with pytest.raises(ValueError, match="unknown sampling method"):
        resample(np.zeros((5, 3)), 4, "grid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="colours"):
        resample(np.zeros((5, 3)), 4, colors=np.zeros((4, 3)))

"""Cameras: look-at geometry, projection, JSON reading/writing and its errors, embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genlab.data.cameras import (
    Camera,
    CameraReadError,
    camera_embedding,
    camera_embeddings,
    look_at_camera,
    read_camera_json,
    write_camera_json,
)


def write(tmp_path: Path, data: Any, name: str = "cam.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize(
    ("elevation", "azimuth", "distance"),
    [(0, 0, 2.0), (30, 45, 3.5), (-20, 200, 1.2), (89.5, 10, 2.0), (90, 30, 2.0), (-90, 250, 4.0)],
)
def test_look_at_inverse(elevation: float, azimuth: float, distance: float) -> None:
    cam = look_at_camera(elevation, azimuth, distance)
    el, az, dist = cam.elevation_azimuth_distance()
    assert el == pytest.approx(elevation, abs=1e-9)
    assert az == pytest.approx(azimuth, abs=1e-7)
    assert dist == pytest.approx(distance, rel=1e-12)
    rotation = cam.world_to_camera[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)


def test_position_and_camera_to_world() -> None:
    cam = look_at_camera(30, 60, 2.0, target=(1.0, -1.0, 0.5))
    el, az = math.radians(30), math.radians(60)
    expected = np.array([1.0, -1.0, 0.5]) + 2.0 * np.array(
        [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
    )
    np.testing.assert_allclose(cam.position, expected, atol=1e-12)
    np.testing.assert_allclose(cam.camera_to_world @ cam.world_to_camera, np.eye(4), atol=1e-12)
    assert cam.elevation_azimuth_distance(target=(1.0, -1.0, 0.5)) == pytest.approx((30, 60, 2.0))
    # the camera looks along +z of its frame: the target is straight ahead
    np.testing.assert_allclose(cam.camera_to_world[:3, 2], -(expected - [1, -1, 0.5]) / 2.0)


def test_target_projects_to_principal_point_and_up_is_up() -> None:
    cam = look_at_camera(25, 130, 3.0, fov_deg=50, width=320, height=200)
    assert (cam.cx, cam.cy) == (160.0, 100.0)
    assert cam.fx == cam.fy == pytest.approx(100.0 / math.tan(math.radians(25)))
    np.testing.assert_allclose(cam.intrinsics(), [[cam.fx, 0, 160], [0, cam.fy, 100], [0, 0, 1]])
    pixels, depth = cam.project(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, -0.3]]))
    np.testing.assert_allclose(pixels[0], [160.0, 100.0], atol=1e-9)
    assert depth[0] == pytest.approx(3.0)
    assert pixels[1, 1] < 100.0 - 5 and pixels[2, 1] > 100.0 + 5  # +z goes up the image
    assert abs(pixels[1, 0] - 160.0) < 1e-9  # straight up: no sideways shift


def test_azimuth_turns_to_the_right_of_the_image() -> None:
    # from az=0 (on +x looking at the origin) +y is on the right of the image
    cam = look_at_camera(0, 0, 2.0, width=64, height=64)
    pixels, _ = cam.project(np.array([[0.0, 0.2, 0.0]]))
    assert pixels[0, 0] > 32.0 + 1 and pixels[0, 1] == pytest.approx(32.0)


def test_projection_matches_the_pinhole_formula() -> None:
    cam = look_at_camera(10, 20, 5.0, fov_deg=30, width=100, height=80)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3))
    pixels, depth = cam.project(points)
    local = (cam.world_to_camera @ np.c_[points, np.ones(50)].T).T[:, :3]
    homogeneous = (cam.intrinsics() @ local.T).T
    np.testing.assert_allclose(pixels, homogeneous[:, :2] / homogeneous[:, 2:], atol=1e-9)
    np.testing.assert_allclose(depth, local[:, 2], atol=1e-12)


def test_camera_validation() -> None:
    with pytest.raises(ValueError, match=r"^world_to_camera must be 4x4, got 3x3$"):
        Camera(np.eye(3), 1, 1, 0, 0, 8, 8)
    with pytest.raises(ValueError, match=r"^fx must be positive, got -1$"):
        Camera(np.eye(4), -1, 1, 0, 0, 8, 8)
    with pytest.raises(ValueError, match=r"^height must be a positive integer, got 0$"):
        Camera(np.eye(4), 1, 1, 0, 0, 8, 0)
    cam = Camera(np.eye(4), 1, 1, 0, 0, 8, 8)
    assert cam == Camera(np.eye(4), 1.0, 1.0, 0.0, 0.0, 8, 8)
    assert hash(cam) == hash(Camera(np.eye(4), 1.0, 1.0, 0.0, 0.0, 8, 8))
    assert cam != Camera(np.eye(4), 1, 2, 0, 0, 8, 8)
    with pytest.raises(ValueError):
        cam.world_to_camera[0, 0] = 2.0  # read-only


# ------------------------------------------------------------------------------ JSON


def test_write_read_round_trip(tmp_path: Path) -> None:
    cam = look_at_camera(35, 290, 2.7, fov_deg=45, width=96, height=64)
    path = tmp_path / "sub" / "view.json"
    write_camera_json(cam, path)
    assert read_camera_json(path) == cam  # exact: JSON floats round-trip
    data = json.loads(path.read_text())
    assert sorted(data) == sorted(
        ["world_to_camera", "fx", "fy", "cx", "cy", "width", "height"]
        + ["elevation", "azimuth", "distance"]
    )
    assert (data["elevation"], data["azimuth"], data["distance"]) == pytest.approx((35, 290, 2.7))
    assert [p.name for p in path.parent.iterdir()] == ["view.json"]  # no temporary file left


def test_round_trip_of_a_rolled_camera(tmp_path: Path) -> None:
    base = look_at_camera(20, 40, 3.0)
    roll = np.eye(4)
    c, s = math.cos(0.3), math.sin(0.3)
    roll[:2, :2] = [[c, -s], [s, c]]
    cam = Camera(roll @ base.world_to_camera, 100, 110, 30, 34, 60, 68)
    write_camera_json(cam, tmp_path / "rolled.json")
    assert read_camera_json(tmp_path / "rolled.json") == cam


def test_json_variants_give_the_same_camera(tmp_path: Path) -> None:
    cam = look_at_camera(30, 45, 3.0, fov_deg=40, width=64, height=48)
    intrinsics = cam.intrinsics().tolist()
    variants = {
        "focal": {
            "fx": cam.fx,
            "fy": cam.fy,
            "cx": cam.cx,
            "cy": cam.cy,
            "width": 64,
            "height": 48,
            "world_to_camera": cam.world_to_camera.tolist(),
        },
        "matrix_c2w": {"intrinsics": intrinsics, "camera_to_world": cam.camera_to_world.tolist()},
        "fov_polar": {
            "fov_deg": 40,
            "width": 64,
            "height": 48,
            "elevation": 30,
            "azimuth": 45,
            "distance": 3.0,
        },
        "all": {
            "fx": cam.fx,
            "fy": cam.fy,
            "cx": cam.cx,
            "cy": cam.cy,
            "intrinsics": intrinsics,
            "fov_deg": 40,
            "world_to_camera": cam.world_to_camera.tolist(),
            "camera_to_world": cam.camera_to_world.tolist(),
            "elevation": 30,
            "azimuth": 45 + 360,
            "distance": 3.0,
            "note": "unknown keys are ignored",
        },
    }
    for name, data in variants.items():
        got = read_camera_json(write(tmp_path, data, f"{name}.json"))
        np.testing.assert_allclose(got.world_to_camera, cam.world_to_camera, atol=1e-12)
        assert (got.fx, got.fy, got.cx, got.cy) == pytest.approx((cam.fx, cam.fy, 32, 24))
        assert (got.width, got.height) == (64, 48), name


def test_polar_pose_with_target(tmp_path: Path) -> None:
    data = {"fov_deg": 30, "width": 8, "height": 8, "elevation": 0, "azimuth": 90}
    data.update(distance=2, target=[1, 2, 3])
    cam = read_camera_json(write(tmp_path, data))
    np.testing.assert_allclose(cam.position, [1, 4, 3], atol=1e-12)


_W2C = np.eye(4).tolist()
_GOOD = {"fx": 50, "fy": 50, "cx": 16, "cy": 16, "width": 32, "height": 32, "world_to_camera": _W2C}


def _with(**changes: Any) -> dict[str, Any]:
    data = {k: v for k, v in _GOOD.items() if k not in changes or changes[k] is not ...}
    data.update({k: v for k, v in changes.items() if v is not ...})
    return data


def _matrix(rotation: Any = None, last_row: Any = None) -> list[list[float]]:
    m = np.eye(4)
    if rotation is not None:
        m[:3, :3] = rotation
    if last_row is not None:
        m[3] = last_row
    return m.tolist()


_ERRORS: list[tuple[str, Any, str]] = [
    (
        "not_json",
        '{"fx": 1,\n}',
        "cam.json:2: invalid JSON: Expecting property name enclosed in double quotes",
    ),
    ("list", "[1, 2]", "cam.json: expected a JSON object, got a list"),
    ("missing_cy", _with(cy=...), "cam.json: missing key 'cy' (give all of fx, fy, cx, cy)"),
    (
        "no_intrinsics",
        _with(fx=..., fy=..., cx=..., cy=...),
        "cam.json: missing intrinsics: give fx, fy, cx, cy, or intrinsics (3x3), or fov_deg",
    ),
    (
        "no_pose",
        _with(world_to_camera=...),
        "cam.json: missing pose: give world_to_camera, camera_to_world, or elevation, azimuth "
        "and distance",
    ),
    ("w2c_3x4", _with(world_to_camera=_W2C[:3]), "cam.json: world_to_camera must be 4x4, got 3x4"),
    (
        "w2c_4x3",
        _with(world_to_camera=[r[:3] for r in _W2C]),
        "cam.json: world_to_camera must be 4x4, got 4x3",
    ),
    (
        "w2c_ragged",
        _with(world_to_camera=[[1, 0, 0, 0], [0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        "cam.json: world_to_camera must be 4x4, got rows of different lengths",
    ),
    (
        "w2c_not_list",
        _with(world_to_camera="eye"),
        "cam.json: world_to_camera must be a 4x4 nested list of numbers",
    ),
    (
        "w2c_strings",
        _with(world_to_camera=[["1", 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        "cam.json: world_to_camera must hold only numbers",
    ),
    (
        "w2c_nan",
        '{"fx": 50, "fy": 50, "cx": 16, "cy": 16, "width": 32, "height": 32, "world_to_camera": '
        "[[1, 0, 0, NaN], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}",
        "cam.json: world_to_camera has non-finite values (NaN or inf)",
    ),
    (
        "w2c_scaled",
        _with(world_to_camera=_matrix(rotation=2 * np.eye(3))),
        "cam.json: world_to_camera rotation is not orthonormal (max |R R^T - I| = 3 > 0.001)",
    ),
    (
        "w2c_reflection",
        _with(world_to_camera=_matrix(rotation=np.diag([1.0, 1.0, -1.0]))),
        "cam.json: world_to_camera rotation has determinant -1 (a reflection), need +1",
    ),
    (
        "w2c_last_row",
        _with(world_to_camera=_matrix(last_row=[0, 0, 1, 1])),
        "cam.json: world_to_camera last row must be [0, 0, 0, 1], got [0, 0, 1, 1]",
    ),
    (
        "c2w_reflection",
        _with(world_to_camera=..., camera_to_world=_matrix(rotation=-np.eye(3))),
        "cam.json: camera_to_world rotation has determinant -1 (a reflection), need +1",
    ),
    (
        "pose_disagree",
        _with(camera_to_world=[[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        "cam.json: world_to_camera and camera_to_world disagree (max difference 0.5)",
    ),
    (
        "polar_disagree",
        _with(elevation=0, azimuth=0, distance=2),
        "cam.json: elevation/azimuth/distance put the camera at [2, 0, 0] but world_to_camera "
        "puts it at [0, 0, 0]",
    ),
    (
        "polar_incomplete",
        _with(world_to_camera=..., elevation=10, azimuth=20),
        "cam.json: missing key 'distance' (give all of elevation, azimuth, distance)",
    ),
    (
        "polar_distance",
        _with(world_to_camera=..., elevation=10, azimuth=20, distance=0),
        "cam.json: distance must be positive, got 0",
    ),
    (
        "polar_target",
        _with(world_to_camera=..., elevation=10, azimuth=20, distance=1, target=[1, 2]),
        "cam.json: target must be 3 numbers, got [1, 2]",
    ),
    ("fx_negative", _with(fx=-100), "cam.json: fx must be positive, got -100"),
    ("fy_zero", _with(fy=0), "cam.json: fy must be positive, got 0"),
    ("fx_string", _with(fx="abc"), 'cam.json: fx must be a number, got "abc"'),
    ("fx_bool", _with(fx=True), "cam.json: fx must be a number, got true"),
    (
        "fx_inf",
        '{"fx": Infinity, "fy": 1, "cx": 1, "cy": 1, "width": 2, "height": 2, '
        '"world_to_camera": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}',
        "cam.json: fx must be finite, got inf",
    ),
    ("width_zero", _with(width=0), "cam.json: width must be a positive integer, got 0"),
    (
        "height_fraction",
        _with(height=12.5),
        "cam.json: height must be a positive integer, got 12.5",
    ),
    (
        "width_not_implied",
        _with(width=..., cx=15.3),
        "cam.json: missing key 'width' (it may be left out only when 2 * cx is a positive whole "
        "number, got cx=15.3)",
    ),
    (
        "fov_without_size",
        _with(fx=..., fy=..., cx=..., cy=..., width=..., fov_deg=40),
        "cam.json: missing key 'width' (required with fov_deg)",
    ),
    (
        "fov_range",
        _with(fx=..., fy=..., cx=..., cy=..., fov_deg=180),
        "cam.json: fov_deg must be in (0, 180), got 180",
    ),
    ("fov_disagree", _with(fov_deg=90), "cam.json: fov_deg and fx/fy/cx/cy disagree"),
    (
        "intrinsics_shape",
        _with(fx=..., fy=..., cx=..., cy=..., intrinsics=[[1, 0, 0], [0, 1, 0]]),
        "cam.json: intrinsics must be 3x3, got 2x3",
    ),
    (
        "intrinsics_skew",
        _with(fx=..., fy=..., cx=..., cy=..., intrinsics=[[50, 1, 16], [0, 50, 16], [0, 0, 1]]),
        "cam.json: intrinsics must have the form [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]",
    ),
    (
        "intrinsics_disagree",
        _with(intrinsics=[[60, 0, 16], [0, 50, 16], [0, 0, 1]]),
        "cam.json: fx/fy/cx/cy and intrinsics disagree",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"), [e[1:] for e in _ERRORS], ids=[e[0] for e in _ERRORS]
)
def test_malformed_files(tmp_path: Path, content: Any, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(CameraReadError) as info:
        read_camera_json(path)
    assert str(info.value) == f"{tmp_path}/{message}"
    assert info.value.path == str(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CameraReadError) as info:
        read_camera_json(tmp_path / "nope.json")
    assert str(info.value) == f"{tmp_path / 'nope.json'}: file not found"


def test_size_from_principal_point_and_tolerated_last_row(tmp_path: Path) -> None:
    data = _with(width=..., height=..., cx=20, cy=11.5)
    data["world_to_camera"] = _matrix(last_row=[0, 0, 1e-12, 1])
    cam = read_camera_json(write(tmp_path, data))
    assert (cam.width, cam.height) == (40, 23)
    np.testing.assert_array_equal(cam.world_to_camera[3], [0, 0, 0, 1])


# ------------------------------------------------------------------------------ embedding


def test_embedding_known_pair() -> None:
    cond = look_at_camera(0, 0, 2.0)
    target = look_at_camera(30, 90, 2.0)
    half = math.sqrt(3) / 2
    image = camera_embedding(cond, target, "image")
    assert image.dtype == np.float32 and image.shape == (10,)
    expected_image = [0, 0.5, 1, 0, math.sin(1), 1, half, 0, 1, math.cos(1)]
    np.testing.assert_allclose(image, expected_image, atol=1e-6)
    normal = camera_embedding(cond, target, "normal")
    expected_normal = [0, 0.5, 1, math.sin(1), 0, 1, half, 0, math.cos(1), 1]
    np.testing.assert_allclose(normal, expected_normal, atol=1e-6)


def test_embeddings_relative_angles() -> None:
    cond = look_at_camera(20, 300, 1.5)
    targets = [look_at_camera(-10, 60, 3.0), look_at_camera(20, 300, 1.0)]
    emb = camera_embeddings(cond, targets, "image")
    assert emb.shape == (2, 10) and emb.dtype == np.float32
    x0 = np.radians([20, -30, 120])  # azimuth 60 - 300 = -240 = 120 mod 360
    np.testing.assert_allclose(emb[0, :3], np.sin(x0), atol=1e-6)
    np.testing.assert_allclose(emb[0, 5:8], np.cos(x0), atol=1e-6)
    x1 = np.radians([20, 0, 0])  # same direction, other distance: no difference
    np.testing.assert_allclose(emb[1, :3], np.sin(x1), atol=1e-6)
    np.testing.assert_allclose(emb[1], camera_embedding(cond, targets[1], "image"))
    with pytest.raises(ValueError, match="task must be 'image' or 'normal', got 'depth'"):
        camera_embeddings(cond, targets, "depth")  # type: ignore[arg-type]

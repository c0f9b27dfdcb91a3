"""Pinhole cameras: reading/writing JSON camera files, look-at cameras, multi-view embeddings.

Conventions
-----------
- World: z is up. The *azimuth* is measured in the xy-plane from +x towards +y, the
  *elevation* above the xy-plane (both in degrees). A camera at ``(elevation, azimuth,
  distance)`` from a target sits at
  ``target + distance * (cos(el) cos(az), cos(el) sin(az), sin(el))``.
- Camera frame (OpenCV): x right, y down, z forward (the camera looks along +z).
  ``world_to_camera`` maps world points to this frame.
- Pixels: the image spans ``[0, width] x [0, height]``; pixel (column ``u``, row ``v``) covers
  ``[u, u + 1) x [v, v + 1)``, so its centre is at ``(u + 0.5, v + 0.5)`` and the centre of
  the image is ``(width / 2, height / 2)``.

Camera embedding
----------------
:func:`camera_embedding` gives the 10 numbers the multi-view diffusion UNet takes as its class
embedding. With angles in radians (elevations and azimuths from
:meth:`Camera.elevation_azimuth_distance` about the world origin)::

    x = [elevation_cond,
         elevation_target - elevation_cond,
         (azimuth_target - azimuth_cond) mod 2 pi,
         task_normal, task_image]          # task one-hot: normal = [1, 0], image = [0, 1]
    embedding = [sin(x_0), ..., sin(x_4), cos(x_0), ..., cos(x_4)]   # float32, (10,)

The task entries are used as the numbers 0 and 1 (not angles).

JSON camera files
-----------------
One JSON object per view (unknown keys are ignored):

- intrinsics, one of
  - ``fx``, ``fy``, ``cx``, ``cy`` (pixels);
  - ``intrinsics``: ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``;
  - ``fov_deg``: vertical field of view in degrees, in (0, 180); then ``fx = fy =
    (height / 2) / tan(fov / 2)``, ``cx = width / 2``, ``cy = height / 2``.
- ``width``, ``height``: positive integers. Required with ``fov_deg``; with ``fx``... or
  ``intrinsics`` they may be left out when ``2 * cx`` and ``2 * cy`` are whole numbers, which
  then give them.
- pose, one of
  - ``world_to_camera``: 4x4 nested list, a rigid transform (rotation orthonormal within
    1e-3, determinant +1, last row ``[0, 0, 0, 1]``);
  - ``camera_to_world``: 4x4, its inverse;
  - ``elevation``, ``azimuth``, ``distance`` (degrees, degrees, world units; optional
    ``target``, 3 numbers, default the origin): a look-at camera (:func:`look_at_camera`).
    Given together with a matrix they only describe the camera position and must match it.

When more than one intrinsics or pose form is given, they must agree. Every problem raises
:class:`CameraReadError` naming the file, e.g.
``"cam.json: world_to_camera must be 4x4, got 3x4"``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from genlab.data.errors import DataFileError

__all__ = [
    "Camera",
    "CameraReadError",
    "camera_embedding",
    "camera_embeddings",
    "look_at_camera",
    "read_camera_json",
    "write_camera_json",
]

Task = Literal["image", "normal"]

#: Largest allowed ``|R R^T - I|`` entry of a camera rotation.
ORTHONORMAL_TOLERANCE = 1e-3
_TASK_ONE_HOT: dict[str, tuple[float, float]] = {"normal": (1.0, 0.0), "image": (0.0, 1.0)}


class CameraReadError(DataFileError):
    """A camera file could not be read or is invalid; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: rigid ``world_to_camera`` pose (OpenCV frame) and pixel intrinsics.

    Raises ``ValueError`` for a non-rigid or non-finite pose and non-positive focal lengths
    or image size. Two cameras are equal when all their values are.
    """

    world_to_camera: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        matrix = np.array(self.world_to_camera, dtype=np.float64)
        problem = _rigid_problem(matrix, "world_to_camera")
        if problem is not None:
            raise ValueError(problem)
        matrix[3] = (0.0, 0.0, 0.0, 1.0)
        matrix.setflags(write=False)
        object.__setattr__(self, "world_to_camera", matrix)
        for name in ("fx", "fy", "cx", "cy"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            if name in ("fx", "fy") and value <= 0:
                raise ValueError(f"{name} must be positive, got {value:g}")
            object.__setattr__(self, name, value)
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
            object.__setattr__(self, name, int(value))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Camera):
            return NotImplemented
        return bool(np.array_equal(self.world_to_camera, other.world_to_camera)) and (
            self._scalars() == other._scalars()
        )

    def __hash__(self) -> int:
        return hash((self.world_to_camera.tobytes(), self._scalars()))

    def _scalars(self) -> tuple[float, float, float, float, int, int]:
        return (self.fx, self.fy, self.cx, self.cy, self.width, self.height)

    @property
    def camera_to_world(self) -> np.ndarray:
        """The inverse pose ``(4, 4)``: camera frame -> world."""
        return np.linalg.inv(self.world_to_camera)

    @property
    def position(self) -> np.ndarray:
        """The camera centre in world coordinates ``(3,)``."""
        return self.camera_to_world[:3, 3].copy()

    def elevation_azimuth_distance(
        self, target: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> tuple[float, float, float]:
        """Elevation (degrees, [-90, 90]), azimuth (degrees, [0, 360)) and distance of the centre.

        Seen from ``target``. Straight above or below the target (elevation +-90) the
        position has no azimuth; it is then taken from the camera's orientation, the one
        :func:`look_at_camera` would give (so look-at cameras round-trip at the poles too).
        """
        offset = self.position - np.asarray(target, dtype=np.float64)
        distance = float(np.linalg.norm(offset))
        if distance == 0.0:
            return 0.0, self._roll_azimuth(), 0.0
        elevation = math.degrees(math.asin(max(-1.0, min(1.0, offset[2] / distance))))
        if math.hypot(offset[0], offset[1]) <= 1e-9 * distance:
            azimuth = self._roll_azimuth()
        else:
            azimuth = math.degrees(math.atan2(offset[1], offset[0]))
        return elevation, _wrap_degrees(azimuth), distance

    def _roll_azimuth(self) -> float:
        """Azimuth whose look-at camera has this camera's x axis (right = (-sin az, cos az, 0))."""
        right = self.world_to_camera[0, :3]
        return _wrap_degrees(math.degrees(math.atan2(-right[0], right[1])))

    def intrinsics(self) -> np.ndarray:
        """The pixel intrinsics matrix ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` ``(3, 3)``."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates ``(N, 2)`` (column, row) and camera depths ``z`` ``(N,)`` of points.

        Only points with depth > 0 (in front of the camera) have meaningful pixel coordinates.
        """
        points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        cam = points @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]
        depth = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.fx * cam[:, 0] / depth + self.cx
            v = self.fy * cam[:, 1] / depth + self.cy
        return np.stack([u, v], axis=1), depth


def look_at_camera(
    elevation_deg: float,
    azimuth_deg: float,
    distance: float,
    fov_deg: float = 40.0,
    width: int = 256,
    height: int = 256,
    target: Sequence[float] = (0.0, 0.0, 0.0),
) -> Camera:
    """A camera at ``(elevation, azimuth, distance)`` from ``target`` looking at it.

    World +z points up in the image. ``fov_deg`` is the vertical field of view (square
    pixels, principal point at the image centre). The image x axis is always
    ``(-sin az, cos az, 0)``, which stays defined at elevation +-90 (looking straight down
    or up), where the image "up" direction then points away from the azimuth.
    """
    if not (math.isfinite(distance) and distance > 0):
        raise ValueError(f"distance must be positive, got {distance}")
    if not 0 < fov_deg < 180:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    el, az = math.radians(elevation_deg), math.radians(azimuth_deg)
    direction = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    position = np.asarray(target, dtype=np.float64) + distance * direction
    forward = -direction
    right = np.array([-math.sin(az), math.cos(az), 0.0])
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = -rotation @ position
    focal = (height / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return Camera(matrix, focal, focal, width / 2.0, height / 2.0, width, height)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def camera_embedding(cond: Camera, target: Camera, task: Task) -> np.ndarray:
    """The ``(10,)`` float32 embedding of ``target`` relative to ``cond`` (see the module doc)."""
    return camera_embeddings(cond, [target], task)[0]


def camera_embeddings(cond: Camera, targets: Sequence[Camera], task: Task) -> np.ndarray:
    """Embeddings ``(N, 10)`` float32 of each target relative to ``cond`` (see the module doc)."""
    if task not in _TASK_ONE_HOT:
        raise ValueError(f"task must be 'image' or 'normal', got {task!r}")
    el_cond, az_cond, _ = cond.elevation_azimuth_distance()
    rows = []
    for camera in targets:
        el, az, _ = camera.elevation_azimuth_distance()
        rows.append(
            [
                math.radians(el_cond),
                math.radians(el - el_cond),
                math.radians((az - az_cond) % 360.0),
                *_TASK_ONE_HOT[task],
            ]
        )
    x = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return np.concatenate([np.sin(x), np.cos(x)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_camera_json(camera: Camera, path: str | os.PathLike[str]) -> None:
    """Write ``camera`` as JSON (world_to_camera, fx, fy, cx, cy, width, height).

    The elevation, azimuth and distance about the origin are added for readability (left
    out for a camera at the origin). Parent folders are created; the file is written to a
    temporary file in the same folder and moved into place.
    """
    data: dict[str, Any] = {
        "world_to_camera": camera.world_to_camera.tolist(),
        "fx": camera.fx,
        "fy": camera.fy,
        "cx": camera.cx,
        "cy": camera.cy,
        "width": camera.width,
        "height": camera.height,
    }
    elevation, azimuth, distance = camera.elevation_azimuth_distance()
    if distance > 0:
        data.update(elevation=elevation, azimuth=azimuth, distance=distance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_camera_json(path: str | os.PathLike[str]) -> Camera:
    """Read one camera file (schema in the module docstring); raises :class:`CameraReadError`."""
    data = _load_json(path)
    fx, fy, cx, cy = _read_intrinsics(path, data)
    width = _read_size(path, data, "width", cx, "cx")
    height = _read_size(path, data, "height", cy, "cy")
    if "fov_deg" in data:
        fov_values = _fov_intrinsics(path, data, width, height)
        if not _same_intrinsics(fov_values, (fx, fy, cx, cy)) and _has_other_intrinsics(data):
            raise CameraReadError(path, f"fov_deg and {_other_intrinsics_name(data)} disagree")
        fx, fy, cx, cy = fov_values
    matrix = _read_pose(path, data)
    try:
        return Camera(matrix, fx, fy, cx, cy, width, height)
    except ValueError as err:  # pragma: no cover - everything is checked above
        raise CameraReadError(path, str(err)) from err


def _load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CameraReadError(path, "file not found" if not p.exists() else "not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CameraReadError(path, f"not UTF-8 text: {err.reason}") from err
    except OSError as err:
        raise CameraReadError(path, f"cannot read file: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CameraReadError(path, f"invalid JSON: {err.msg}", line=err.lineno) from err
    if not isinstance(data, dict):
        raise CameraReadError(path, f"expected a JSON object, got {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _number(path: str | os.PathLike[str], data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CameraReadError(path, f"{key} must be a number, got {json.dumps(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise CameraReadError(path, f"{key} must be finite, got {value}")
    return value


def _matrix(
    path: str | os.PathLike[str], data: dict[str, Any], key: str, rows: int, cols: int
) -> np.ndarray:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise CameraReadError(path, f"{key} must be a {rows}x{cols} nested list of numbers")
    if len({len(row) for row in value}) > 1:
        raise CameraReadError(path, f"{key} must be {rows}x{cols}, got rows of different lengths")
    shape = (len(value), len(value[0]) if value else 0)
    if shape != (rows, cols):
        raise CameraReadError(path, f"{key} must be {rows}x{cols}, got {shape[0]}x{shape[1]}")
    flat = [item for row in value for item in row]
    if any(isinstance(item, bool) or not isinstance(item, (int, float)) for item in flat):
        raise CameraReadError(path, f"{key} must hold only numbers")
    matrix = np.asarray(value, dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise CameraReadError(path, f"{key} has non-finite values (NaN or inf)")
    return matrix


def _require_all(path: str | os.PathLike[str], data: dict[str, Any], keys: Sequence[str]) -> None:
    for key in keys:
        if key not in data:
            raise CameraReadError(path, f"missing key {key!r} (give all of {', '.join(keys)})")


_FOCAL_KEYS = ("fx", "fy", "cx", "cy")
_POLAR_KEYS = ("elevation", "azimuth", "distance")


def _has_other_intrinsics(data: dict[str, Any]) -> bool:
    return "intrinsics" in data or any(key in data for key in _FOCAL_KEYS)


def _other_intrinsics_name(data: dict[str, Any]) -> str:
    return "intrinsics" if "intrinsics" in data else "fx/fy/cx/cy"


def _read_intrinsics(
    path: str | os.PathLike[str], data: dict[str, Any]
) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy from ``fx``... and/or ``intrinsics`` (NaN when only ``fov_deg`` is given)."""
    found: list[tuple[float, float, float, float]] = []
    if any(key in data for key in _FOCAL_KEYS):
        _require_all(path, data, _FOCAL_KEYS)
        found.append(tuple(_number(path, data, key) for key in _FOCAL_KEYS))  # type: ignore[arg-type]
    if "intrinsics" in data:
        k = _matrix(path, data, "intrinsics", 3, 3)
        if not (k[0, 1] == 0 and k[1, 0] == 0 and np.array_equal(k[2], [0.0, 0.0, 1.0])):
            raise CameraReadError(
                path, "intrinsics must have the form [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]"
            )
        found.append((float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])))
    if not found:
        if "fov_deg" not in data:
            raise CameraReadError(
                path, "missing intrinsics: give fx, fy, cx, cy, or intrinsics (3x3), or fov_deg"
            )
        return (math.nan,) * 4  # type: ignore[return-value]
    if len(found) == 2 and not _same_intrinsics(found[0], found[1]):
        raise CameraReadError(path, "fx/fy/cx/cy and intrinsics disagree")
    fx, fy, cx, cy = found[0]
    for name, value in (("fx", fx), ("fy", fy)):
        if value <= 0:
            raise CameraReadError(path, f"{name} must be positive, got {value:g}")
    return fx, fy, cx, cy


def _same_intrinsics(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))


def _read_size(
    path: str | os.PathLike[str], data: dict[str, Any], key: str, centre: float, centre_key: str
) -> int:
    if key not in data:
        if "fov_deg" in data and not _has_other_intrinsics(data):
            raise CameraReadError(path, f"missing key {key!r} (required with fov_deg)")
        if abs(2 * centre - round(2 * centre)) > 1e-6 or round(2 * centre) <= 0:
            raise CameraReadError(
                path,
                f"missing key {key!r} (it may be left out only when 2 * {centre_key} is a "
                f"positive whole number, got {centre_key}={centre:g})",
            )
        return round(2 * centre)
    value = data[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
        or value <= 0
    ):
        raise CameraReadError(path, f"{key} must be a positive integer, got {json.dumps(value)}")
    return int(value)


def _fov_intrinsics(
    path: str | os.PathLike[str], data: dict[str, Any], width: int, height: int
) -> tuple[float, float, float, float]:
    fov = _number(path, data, "fov_deg")
    if not 0 < fov < 180:
        raise CameraReadError(path, f"fov_deg must be in (0, 180), got {fov:g}")
    focal = (height / 2.0) / math.tan(math.radians(fov) / 2.0)
    return focal, focal, width / 2.0, height / 2.0


def _read_pose(path: str | os.PathLike[str], data: dict[str, Any]) -> np.ndarray:
    """The world_to_camera matrix from whichever pose keys are given, checked for agreement."""
    matrices: list[tuple[str, np.ndarray]] = []
    for key in ("world_to_camera", "camera_to_world"):
        if key in data:
            matrix = _matrix(path, data, key, 4, 4)
            problem = _rigid_problem(matrix, key)
            if problem is not None:
                raise CameraReadError(path, problem)
            matrices.append((key, matrix if key == "world_to_camera" else np.linalg.inv(matrix)))
    polar = None
    if any(key in data for key in _POLAR_KEYS):
        polar = _read_polar(path, data)
    if not matrices:
        if polar is None:
            raise CameraReadError(
                path,
                "missing pose: give world_to_camera, camera_to_world, or elevation, azimuth "
                "and distance",
            )
        (elevation, azimuth, distance), target = polar
        return look_at_camera(elevation, azimuth, distance, target=target).world_to_camera.copy()
    (first_key, matrix) = matrices[0]
    if len(matrices) == 2:
        difference = float(np.abs(matrices[1][1] - matrix).max())
        if difference > _pose_tolerance(matrix):
            raise CameraReadError(
                path,
                f"world_to_camera and camera_to_world disagree (max difference {difference:.3g})",
            )
    if polar is not None:
        (elevation, azimuth, distance), target = polar
        el, az = math.radians(elevation), math.radians(azimuth)
        expected = np.asarray(target) + distance * np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        )
        actual = np.linalg.inv(matrix)[:3, 3]
        if np.abs(expected - actual).max() > 1e-4 * max(1.0, distance):
            raise CameraReadError(
                path,
                f"elevation/azimuth/distance put the camera at {_fmt(expected)} but "
                f"{first_key} puts it at {_fmt(actual)}",
            )
    return matrix


def _read_polar(
    path: str | os.PathLike[str], data: dict[str, Any]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    _require_all(path, data, _POLAR_KEYS)
    elevation, azimuth, distance = (_number(path, data, key) for key in _POLAR_KEYS)
    if distance <= 0:
        raise CameraReadError(path, f"distance must be positive, got {distance:g}")
    target = (0.0, 0.0, 0.0)
    if "target" in data:
        value = data["target"]
        if (
            not isinstance(value, list)
            or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
        ):
            raise CameraReadError(path, f"target must be 3 numbers, got {json.dumps(value)}")
        if not all(math.isfinite(v) for v in value):
            raise CameraReadError(path, "target has non-finite values (NaN or inf)")
        target = (float(value[0]), float(value[1]), float(value[2]))
    return (elevation, azimuth, distance), target


def _pose_tolerance(matrix: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(matrix[:3, 3]).max()))


def _fmt(vector: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in vector) + "]"


def _rigid_problem(matrix: np.ndarray, name: str) -> str | None:
    """Why ``matrix`` is not a finite 4x4 rigid transform, or None when it is one."""
    if matrix.shape != (4, 4):
        shape = "x".join(str(s) for s in matrix.shape)
        return f"{name} must be 4x4, got {shape}"
    if not np.isfinite(matrix).all():
        return f"{name} has non-finite values (NaN or inf)"
    if np.abs(matrix[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-9:
        return f"{name} last row must be [0, 0, 0, 1], got {_fmt(matrix[3])}"
    rotation = matrix[:3, :3]
    error = float(np.abs(rotation @ rotation.T - np.eye(3)).max())
    if error > ORTHONORMAL_TOLERANCE:
        return (
            f"{name} rotation is not orthonormal "
            f"(max |R R^T - I| = {error:.3g} > {ORTHONORMAL_TOLERANCE:g})"
        )
    if np.linalg.det(rotation) < 0:
        return f"{name} rotation has determinant -1 (a reflection), need +1"
    return None


def _wrap_degrees(angle: float) -> float:
    """``angle`` in [0, 360)."""
    wrapped = angle % 360.0
    return 0.0 if wrapped >= 360.0 else wrapped

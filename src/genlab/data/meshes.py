"""Mesh reading: a tolerant OFF parser, a trimesh-based loader and unit-cube normalisation.

Every reading problem raises :class:`MeshReadError`, whose message names the file (and the
1-based line number for OFF files), e.g. ``"chair_0001.off:5: expected 3 vertex coordinates,
got 2"``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import trimesh

from genlab.data.errors import DataFileError

__all__ = [
    "MESH_EXTENSIONS",
    "MeshReadError",
    "load_mesh",
    "normalize_to_unit_cube",
    "read_off",
]

#: File extensions :func:`load_mesh` understands (lower case, with the dot).
MESH_EXTENSIONS: tuple[str, ...] = (".off", ".obj", ".ply", ".stl", ".glb", ".gltf")

# [ST][C][N][4][n]OFF; genlab reads 3-D files only, so "4" and "n" are rejected later.
_OFF_KEYWORD = re.compile(r"^(ST)?(C)?(N)?(4)?(n)?OFF(?=$|[\s\d+\-.])")

# (1-based line number, whitespace-separated tokens without comments)
_Line = tuple[int, list[str]]


class MeshReadError(DataFileError):
    """A mesh file could not be read; the message names the file, the line and the problem."""


# --------------------------------------------------------------------------------------------
# OFF
# --------------------------------------------------------------------------------------------


def read_off(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read an ASCII OFF file.

    Returns vertices ``float32 (V, 3)`` and triangle faces ``int64 (F, 3)``; polygons are
    fan-triangulated and per-vertex/per-face colours or normals are ignored. Accepts the
    ModelNet header fused with the counts (``OFF490 518 0``), ``#`` comments anywhere, blank
    lines and ``[ST][C][N]OFF`` headers. Raises :class:`MeshReadError` naming file and line.
    """
    raw_lines = _read_lines(path)
    header = list(itertools.islice(_content_lines(raw_lines), 2))
    if not header:
        raise MeshReadError(path, "empty file (no OFF header)")
    num_vertices, num_faces, used = _parse_header(path, header)
    counts_line = header[used - 1][0]
    if num_faces == 0:
        raise MeshReadError(path, "no faces (the header declares 0 faces)", counts_line)
    # 1) bulk parse of the raw lines; 2) the same without comments and blank lines;
    # 3) line by line (polygons, colours, errors with line numbers)
    fast = _parse_body_fast(raw_lines[counts_line:], num_vertices, num_faces)
    if fast is not None:
        return fast
    cleaned = _cleaned_lines(raw_lines, start=counts_line)
    fast = _parse_body_fast([text for _, text in cleaned], num_vertices, num_faces)
    if fast is not None:
        return fast
    body = [(number, text.split()) for number, text in cleaned]
    _check_not_truncated(path, body, num_vertices, num_faces, last_line=counts_line)
    vertices = _parse_vertices(path, body[:num_vertices])
    faces = _parse_faces(path, body[num_vertices : num_vertices + num_faces], num_vertices)
    return vertices, faces


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The file's text lines (UTF-8, BOM and undecodable bytes tolerated)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise MeshReadError(path, f"cannot read file: {err.strerror or err}") from err
    return raw.decode("utf-8-sig", errors="replace").splitlines()


def _cleaned_lines(lines: list[str], start: int = 0) -> list[tuple[int, str]]:
    """Non-blank lines from ``lines[start:]`` without ``#`` comments, with 1-based numbers."""
    cleaned = (
        (number, (line.split("#", 1)[0] if "#" in line else line).strip())
        for number, line in enumerate(itertools.islice(lines, start, None), start=start + 1)
    )
    return [(number, text) for number, text in cleaned if text]


def _content_lines(lines: list[str], start: int = 0) -> Iterator[_Line]:
    """Like :func:`_cleaned_lines`, lazily and split into tokens."""
    for number, line in enumerate(itertools.islice(lines, start, None), start=start + 1):
        tokens = (line.split("#", 1)[0] if "#" in line else line).split()
        if tokens:
            yield number, tokens


def _parse_body_fast(
    lines: list[str], num_vertices: int, num_faces: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Bulk parse of the common case (``x y z`` lines, then ``3 a b c`` lines, no comments).

    Returns None whenever anything deviates; the line-by-line parser then handles the file
    and reports errors with line numbers. Trailing lines after the faces are ignored.
    """
    if len(lines) < num_vertices + num_faces:
        return None
    vertex_text = "\n".join(lines[:num_vertices])
    face_text = "\n".join(lines[num_vertices : num_vertices + num_faces])
    if "#" in vertex_text or "#" in face_text:
        return None
    # exactly 3 values on every vertex line and 4 on every face line (no blank lines, no
    # colours or normals, no polygons, no coordinates split over lines)
    if not (
        _all_lines_have(vertex_text, 3, num_vertices) and _all_lines_have(face_text, 4, num_faces)
    ):
        return None
    try:
        vertices = np.fromstring(vertex_text, dtype=np.float64, sep=" ").reshape(-1, 3)
        faces = np.fromstring(face_text, dtype=np.int64, sep=" ").reshape(-1, 4)
    except ValueError:
        return None
    if not np.isfinite(vertices).all() or (faces[:, 0] != 3).any():
        return None
    faces = faces[:, 1:]
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        return None
    return vertices.astype(np.float32), np.ascontiguousarray(faces)


def _all_lines_have(text: str, count: int, num_lines: int) -> bool:
    """Whether each of the ``num_lines`` lines of ``text`` holds exactly ``count`` tokens."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return num_lines == 0
    blank = (data == 32) | (data == 9) | (data == 10) | (data == 13)
    token_start = ~blank & np.concatenate(([True], blank[:-1]))
    line_of_byte = np.cumsum(data == 10)
    if line_of_byte[-1] + 1 != num_lines:
        return False
    per_line = np.bincount(line_of_byte[token_start], minlength=num_lines)
    return bool((per_line == count).all())


def _parse_header(path: str | os.PathLike[str], lines: list[_Line]) -> tuple[int, int, int]:
    """Return (num_vertices, num_faces, number of content lines the header used: 1 or 2)."""
    number, tokens = lines[0]
    head = " ".join(tokens)
    match = _OFF_KEYWORD.match(head)
    if match is None:
        raise MeshReadError(path, f"missing OFF header, got {_clip(head)!r}", number)
    if match.group(4) or match.group(5):
        raise MeshReadError(
            path, f"only 3-D OFF files are supported, got {match.group(0)!r}", number
        )
    rest = head[match.end() :].split()
    if rest and rest[0].upper() == "BINARY":
        raise MeshReadError(path, "binary OFF files are not supported", number)
    if rest:
        return (*_parse_counts(path, number, rest), 1)
    if len(lines) < 2:
        raise MeshReadError(path, "file ends after the OFF header (no vertex/face counts)", number)
    count_number, count_tokens = lines[1]
    return (*_parse_counts(path, count_number, count_tokens), 2)


def _parse_counts(path: str | os.PathLike[str], number: int, tokens: list[str]) -> tuple[int, int]:
    """Parse ``V F [E]`` counts."""
    if len(tokens) < 2:
        raise MeshReadError(
            path, f"expected vertex and face counts, got {_clip(' '.join(tokens))!r}", number
        )
    counts = []
    for token in tokens[:2]:
        try:
            value = int(token)
        except ValueError:
            raise MeshReadError(
                path, f"expected an integer vertex/face count, got {_clip(token)!r}", number
            ) from None
        if value < 0:
            raise MeshReadError(path, f"negative vertex/face count {value}", number)
        counts.append(value)
    return counts[0], counts[1]


def _check_not_truncated(
    path: str | os.PathLike[str],
    body: list[_Line],
    num_vertices: int,
    num_faces: int,
    last_line: int,
) -> None:
    """Raise when the body has fewer content lines than the header declares."""
    if len(body) >= num_vertices + num_faces:
        return
    found_v = min(len(body), num_vertices)
    found_f = max(0, len(body) - num_vertices)
    raise MeshReadError(
        path,
        f"file truncated: header declares {num_vertices} vertices and {num_faces} faces, "
        f"found {found_v} vertex lines and {found_f} face lines",
        body[-1][0] if body else last_line,
    )


def _parse_vertices(path: str | os.PathLike[str], lines: Sequence[_Line]) -> np.ndarray:
    """Vertex lines -> float32 (V, 3); extra values (colours, normals) are ignored."""
    try:
        if lines and min(len(t) for _, t in lines) < 3:
            raise ValueError
        vertices = np.array([t[:3] for _, t in lines], dtype=np.float64).reshape(-1, 3)
    except ValueError:
        _raise_vertex_error(path, lines)
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        number, tokens = lines[row]
        raise MeshReadError(
            path, f"non-finite vertex coordinate in {_clip(' '.join(tokens[:3]))!r}", number
        )
    return vertices.astype(np.float32)


def _raise_vertex_error(path: str | os.PathLike[str], lines: Sequence[_Line]) -> NoReturn:
    """Slow path: find the first bad vertex line and raise a precise error."""
    for number, tokens in lines:
        if len(tokens) < 3:
            raise MeshReadError(path, f"expected 3 vertex coordinates, got {len(tokens)}", number)
        for token in tokens[:3]:
            _to_float(path, number, token)
    raise MeshReadError(path, "could not parse the vertex block")  # pragma: no cover


def _parse_faces(
    path: str | os.PathLike[str], lines: Sequence[_Line], num_vertices: int
) -> np.ndarray:
    """Face lines ``n i1 .. in [colour]`` -> fan-triangulated int64 (F, 3)."""
    try:
        sizes = np.array([t[0] for _, t in lines], dtype=np.int64)
    except ValueError:
        sizes = np.array([_to_int(path, n, t[0], "vertex count") for n, t in lines], np.int64)
    if len(sizes) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    chunks, order = [], []
    for size in np.unique(sizes):
        rows = np.flatnonzero(sizes == size)
        polygons = _face_indices(path, [lines[r] for r in rows], int(size), num_vertices)
        tris = _fan(polygons)
        chunks.append(tris)
        order.append(np.repeat(rows, int(size) - 2))
    faces = np.concatenate(chunks)
    return faces[np.argsort(np.concatenate(order), kind="stable")]


def _face_indices(
    path: str | os.PathLike[str], lines: Sequence[_Line], size: int, num_vertices: int
) -> np.ndarray:
    """Index block (K, size) for faces that all declare ``size`` vertices."""
    if size < 3:
        number, _ = lines[0]
        raise MeshReadError(path, f"face with {size} vertices (at least 3 needed)", number)
    try:
        if min(len(t) for _, t in lines) < 1 + size:
            raise ValueError
        idx = np.array([t[1 : 1 + size] for _, t in lines], dtype=np.int64)
    except ValueError:
        _raise_face_error(path, lines, size)
    bad = ((idx < 0) | (idx >= num_vertices)).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        value = int(idx[row][(idx[row] < 0) | (idx[row] >= num_vertices)][0])
        raise MeshReadError(
            path,
            f"face index {value} out of range (file has {num_vertices} vertices)",
            lines[row][0],
        )
    return idx


def _raise_face_error(path: str | os.PathLike[str], lines: Sequence[_Line], size: int) -> NoReturn:
    """Slow path: find the first bad face line and raise a precise error."""
    for number, tokens in lines:
        if len(tokens) < 1 + size:
            raise MeshReadError(
                path, f"face declares {size} vertices but lists {len(tokens) - 1}", number
            )
        for token in tokens[1 : 1 + size]:
            _to_int(path, number, token, "vertex index")
    raise MeshReadError(path, "could not parse the face block")  # pragma: no cover


def _fan(polygons: np.ndarray) -> np.ndarray:
    """Fan-triangulate (K, n) polygons into (K * (n - 2), 3) triangles, face by face."""
    n = polygons.shape[1]
    if n == 3:
        return polygons
    first = np.repeat(polygons[:, :1], n - 2, axis=1)
    tris = np.stack([first, polygons[:, 1:-1], polygons[:, 2:]], axis=-1)
    return tris.reshape(-1, 3)


def _to_float(path: str | os.PathLike[str], number: int, token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise MeshReadError(path, f"expected a number, got {_clip(token)!r}", number) from None


def _to_int(path: str | os.PathLike[str], number: int, token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise MeshReadError(
            path, f"expected an integer {what}, got {_clip(token)!r}", number
        ) from None


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Generic loading
# --------------------------------------------------------------------------------------------


def load_mesh(path: str | os.PathLike[str]) -> trimesh.Trimesh:
    """Load a triangle mesh (geometry only) from .off/.obj/.ply/.stl/.glb/.gltf.

    OFF files go through :func:`read_off` and keep their vertices as written; other formats
    are loaded by trimesh without processing, scenes are flattened (node transforms applied)
    into one mesh and coincident vertices are merged. Materials and textures are skipped,
    so missing ones do not matter. Raises :class:`MeshReadError` naming the file for
    unreadable files, unsupported extensions, files without faces and non-finite vertices.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_EXTENSIONS:
        raise MeshReadError(
            path, f"unsupported mesh extension {suffix!r} (supported: {', '.join(MESH_EXTENSIONS)})"
        )
    if not Path(path).is_file():
        raise MeshReadError(path, "file not found" if not Path(path).exists() else "not a file")
    if suffix == ".off":
        vertices, faces = read_off(path)
    else:
        vertices, faces = _load_with_trimesh(path)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    if suffix != ".off":
        mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


def _load_with_trimesh(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load any trimesh-supported file into (vertices, faces) of the flattened scene."""
    try:
        # geometry only: skipping materials avoids decoding textures (and missing-file noise)
        scene = trimesh.load_scene(os.fspath(path), process=False, skip_materials=True)
        mesh = scene.to_mesh()
    except MeshReadError:
        raise
    except Exception as err:  # trimesh raises many types for malformed files
        raise MeshReadError(path, f"cannot read mesh: {type(err).__name__}: {err}") from err
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        kinds = sorted({type(g).__name__ for g in scene.geometry.values()})
        what = f"only {', '.join(kinds)} geometry" if kinds else "no geometry"
        raise MeshReadError(path, f"no faces ({what})")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices).all(axis=1)).sum())
        raise MeshReadError(path, f"{bad} vertices have non-finite coordinates")
    return vertices, faces


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def normalize_to_unit_cube(mesh: trimesh.Trimesh, margin: float = 0.0) -> trimesh.Trimesh:
    """Copy of ``mesh`` centred (bounding box) at the origin, largest extent ``1 - 2*margin``.

    The result fits in ``[-0.5, 0.5]^3`` with ``margin`` free on each side. Raises
    ``ValueError`` for meshes without vertices or with a zero-size bounding box.
    """
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if len(vertices) == 0:
        raise ValueError("cannot normalise a mesh without vertices")
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0.0:
        raise ValueError(
            f"cannot normalise a degenerate mesh: bounding box extents {tuple((hi - lo).tolist())}"
        )
    out = mesh.copy()
    out.vertices = (vertices - (lo + hi) / 2.0) * ((1.0 - 2.0 * margin) / extent)
    return out

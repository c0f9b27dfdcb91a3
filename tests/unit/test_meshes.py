"""Mesh reading: OFF parser quirks and errors, trimesh-based loading, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from genlab.data.meshes import MeshReadError, load_mesh, normalize_to_unit_cube, read_off

CUBE_OFF_BODY = """\
-1 -1 -1
 1 -1 -1
 1  1 -1
-1  1 -1
-1 -1  1
 1 -1  1
 1  1  1
-1  1  1
4 0 3 2 1
4 4 5 6 7
4 0 1 5 4
4 2 3 7 6
4 1 2 6 5
4 3 0 4 7
"""


@pytest.fixture
def trimesh_data(shared_testdata: Path) -> Path:
    folder = shared_testdata / "trimesh"
    if not folder.is_dir():
        pytest.skip(f"trimesh test meshes not present: {folder} does not exist")
    return folder


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ real OFF files


def test_whitespace_off_fused_header(trimesh_data: Path) -> None:
    vertices, faces = read_off(trimesh_data / "whitespace.off")
    assert vertices.shape == (8, 3) and vertices.dtype == np.float32
    assert faces.shape == (12, 3) and faces.dtype == np.int64
    np.testing.assert_allclose(vertices[0], [1.632993, 0.0, 1.154701], rtol=1e-6)
    # first quad "4  0 1 2 3  1.000 0.000 0.000 0.75" fans to (0 1 2), (0 2 3); colours ignored
    np.testing.assert_array_equal(faces[:2], [[0, 1, 2], [0, 2, 3]])


def test_comments_off_matches_whitespace_off(trimesh_data: Path) -> None:
    v1, f1 = read_off(trimesh_data / "comments.off")
    v2, f2 = read_off(trimesh_data / "whitespace.off")
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(f1, f2)
    mesh = load_mesh(trimesh_data / "comments.off")
    assert mesh.is_watertight and mesh.volume > 0


def test_ball_off_volume_matches_reference(trimesh_data: Path) -> None:
    reference = json.loads((trimesh_data / "ref_boolean_volumes.json").read_text())
    mesh = load_mesh(trimesh_data / "ballA.off")
    assert mesh.vertices.shape == (1900, 3) and mesh.faces.shape == (3796, 3)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(reference["a"], rel=1e-6)
    # ballB is the same mesh moved by (+8, 0, 0)
    moved = load_mesh(trimesh_data / "ballB.off")
    np.testing.assert_allclose(moved.vertices - mesh.vertices, [[8.0, 0.0, 0.0]] * 1900, atol=1e-4)


# ------------------------------------------------------------------------- OFF quirks (tmp files)


def test_quirky_header_comments_blank_lines_and_colours(tmp_path: Path) -> None:
    text = "\t   OFF8 6 12 # fused header\n\n# comment line\n" + CUBE_OFF_BODY.replace(
        "4 0 3 2 1", "4 0 3 2 1  1.0 0.0 0.0 0.75  # face colour and a comment"
    )
    vertices, faces = read_off(write(tmp_path, "quirky.off", text))
    assert vertices.shape == (8, 3) and faces.shape == (12, 3)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(8.0)


def test_counts_on_next_line_and_coff_header(tmp_path: Path) -> None:
    body = "\n".join(line + " 255 0 0 255" for line in CUBE_OFF_BODY.splitlines()[:8])
    faces = "\n".join(CUBE_OFF_BODY.splitlines()[8:])
    vertices, tris = read_off(write(tmp_path, "c.off", f"COFF\n8 6 0\n{body}\n{faces}\n"))
    assert vertices.shape == (8, 3) and tris.shape == (12, 3)
    np.testing.assert_array_equal(vertices[1], [1, -1, -1])


def test_bulk_and_line_by_line_parsing_agree(tmp_path: Path) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v_lines = [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in sphere.vertices]
    f_lines = [f"3 {a} {b} {c}" for a, b, c in sphere.faces]
    header = f"OFF\n{len(v_lines)} {len(f_lines)} 0\n"
    plain = header + "\n".join(v_lines + f_lines) + "\n"
    commented = header + "\n".join(v_lines[:5] + ["", "# note"] + v_lines[5:] + f_lines) + "\n"
    coloured = header + "\n".join(v_lines + [f + " 0.5 0.5 0.5" for f in f_lines]) + "\n"
    results = [
        read_off(write(tmp_path, f"{i}.off", t)) for i, t in enumerate((plain, commented, coloured))
    ]
    for vertices, faces in results:
        np.testing.assert_allclose(vertices, sphere.vertices, atol=1e-6)
        np.testing.assert_array_equal(faces, sphere.faces)
        assert vertices.dtype == np.float32 and faces.dtype == np.int64


def test_mixed_polygons_are_fan_triangulated_in_order(tmp_path: Path) -> None:
    text = (
        "OFF\n6 3 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n0.5 1.5 0\n2 0 0\n3 0 1 5\n5 0 1 2 4 3\n3 1 5 2\n"
    )
    _, faces = read_off(write(tmp_path, "poly.off", text))
    np.testing.assert_array_equal(faces, [[0, 1, 5], [0, 1, 2], [0, 2, 4], [0, 4, 3], [1, 5, 2]])


# ------------------------------------------------------------------------------- OFF errors


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", None, "empty file"),
        ("# only a comment\n\n", None, "empty file"),
        ("PLY\n3 1 0\n", 1, "missing OFF header"),
        ("8 6 12\n0 0 0\n", 1, "missing OFF header"),
        ("OFF\n", 1, "no vertex/face counts"),
        ("OFF\nthree 1 0\n", 2, "expected an integer vertex/face count, got 'three'"),
        ("OFF 3\n", 1, "expected vertex and face counts"),
        ("OFF\n3 1 0\n0 0 0\n1 0\n0 1 0\n3 0 1 2\n", 4, "expected 3 vertex coordinates, got 2"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 abc\n3 0 1 2\n", 5, "expected a number, got 'abc'"),
        # 2 + 4 values add up to 2 vertices: must still be caught on the right line
        ("OFF\n2 1 0\n0 0\n0 0 0 0\n3 0 1 1\n", 3, "expected 3 vertex coordinates, got 2"),
        ("OFF\n3 1 0\n0 0 0\n1 nan 0\n0 1 0\n3 0 1 2\n", 4, "non-finite vertex coordinate"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 inf\n3 0 1 2\n", 5, "non-finite vertex coordinate"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n", 6, "face index 3 out of range"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 -1 2\n", 6, "face index -1 out of range"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n2 0 1\n", 6, "face with 2 vertices"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2\n", 6, "face declares 4 vertices but lists 3"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 x 2\n", 6, "expected an integer vertex index"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3.5 0 1 2\n", 6, "expected an integer vertex count"),
        ("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", 2, "no faces (the header declares 0 faces)"),
        ("OFF0 0 0\n", 1, "no faces"),
        ("OFF BINARY\n", 1, "binary OFF"),
        ("4OFF\n1 0 0\n0 0 0 0\n", 1, "only 3-D OFF"),
    ],
)
def test_off_errors_name_file_line_and_problem(
    tmp_path: Path, text: str, line: int | None, fragment: str
) -> None:
    path = write(tmp_path, "chair_0001.off", text)
    with pytest.raises(MeshReadError) as info:
        read_off(path)
    message = str(info.value)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(prefix), message
    assert fragment in message
    assert info.value.line == line and info.value.path == str(path)


def test_truncated_off_reports_counts_and_last_line(tmp_path: Path) -> None:
    lines = ["OFF", "8 6 12", *CUBE_OFF_BODY.splitlines()[:11]]  # 8 vertices, 3 of 6 faces
    path = write(tmp_path, "cut.off", "\n".join(lines) + "\n")
    with pytest.raises(MeshReadError, match=r"cut\.off:13: file truncated") as info:
        read_off(path)
    assert "declares 8 vertices and 6 faces" in str(info.value)
    assert "found 8 vertex lines and 3 face lines" in str(info.value)


def test_truncated_in_vertex_block(tmp_path: Path) -> None:
    path = write(tmp_path, "cut.off", "OFF\n8 6 12\n0 0 0\n1 0 0\n")
    with pytest.raises(MeshReadError, match="found 2 vertex lines and 0 face lines"):
        read_off(path)


def test_missing_file_is_mesh_read_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.off"
    with pytest.raises(MeshReadError, match=r"missing\.off: cannot read file"):
        read_off(path)
    with pytest.raises(MeshReadError, match=r"missing\.off: file not found"):
        load_mesh(path)


def test_mesh_read_error_is_value_error() -> None:
    assert issubclass(MeshReadError, ValueError)


# ------------------------------------------------------------------------- load_mesh (trimesh)


@pytest.mark.parametrize(
    ("name", "num_vertices", "num_faces"),
    [
        ("sphere.ply", 642, 1280),
        ("cube.glb", 8, 12),
        ("box.obj", 8, 12),  # two materials -> one mesh, corners welded
        ("tet.ply", 4, 4),
        ("soup.stl", 300, 100),  # 100 disconnected triangles stay 300 vertices
    ],
)
def test_load_mesh_counts(trimesh_data: Path, name: str, num_vertices: int, num_faces: int) -> None:
    mesh = load_mesh(trimesh_data / name)
    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.vertices.shape == (num_vertices, 3)
    assert mesh.faces.shape == (num_faces, 3)
    assert np.isfinite(mesh.vertices).all()


def test_load_stl_welds_soup_into_watertight_mesh(trimesh_data: Path) -> None:
    mesh = load_mesh(trimesh_data / "7_8ths_cube.stl")
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(56000.0, rel=1e-6)


def test_obj_with_missing_mtl_loads_geometry(trimesh_data: Path) -> None:
    mesh = load_mesh(trimesh_data / "chair_model.obj")
    assert mesh.faces.shape == (12756, 3)
    assert 0 < len(mesh.vertices) <= 11250  # merged by position


def test_scene_with_several_meshes_is_concatenated(trimesh_data: Path) -> None:
    path = trimesh_data / "CesiumMilkTruck.glb"
    scene = trimesh.load_scene(path, process=False)
    expected_faces = sum(
        len(scene.geometry[scene.graph[node][1]].faces) for node in scene.graph.nodes_geometry
    )
    mesh = load_mesh(path)
    assert len(mesh.faces) == expected_faces
    assert len(scene.graph.nodes_geometry) > len(scene.geometry)  # instanced wheels counted


def test_bunny_scan_loads(trimesh_data: Path) -> None:
    mesh = load_mesh(trimesh_data / "bunny.ply")
    assert mesh.faces.shape == (16301, 3)
    assert len(mesh.vertices) < 8171  # duplicates merged
    assert mesh.extents.max() < 0.2


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("empty.obj", "no faces (no geometry)"),
        ("emptyIO_obj_empty.obj", "no faces"),
        ("emptyIO_obj_points.obj", "no faces (only PointCloud geometry)"),
        ("empty.ply", "no faces"),
        ("emptyIO_ply_empty_header.ply", "no faces"),
        ("points_ascii.ply", "no faces (only PointCloud geometry)"),
        ("empty_nodes.glb", "no faces (no geometry)"),
        ("points_cloudcompare.xyz", "unsupported mesh extension '.xyz'"),
        ("fuze uv.jpg", "unsupported mesh extension '.jpg'"),
    ],
)
def test_load_mesh_errors_name_the_file(trimesh_data: Path, name: str, fragment: str) -> None:
    path = trimesh_data / name
    with pytest.raises(MeshReadError) as info:
        load_mesh(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)


def test_load_mesh_garbage_and_nan(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(b"\x00\x01 definitely not a glb file")
    with pytest.raises(MeshReadError, match=r"garbage\.glb: cannot read mesh"):
        load_mesh(garbage)
    nan_obj = write(tmp_path, "nan.obj", "v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    with pytest.raises(MeshReadError, match=r"nan\.obj: 1 vertices have non-finite"):
        load_mesh(nan_obj)
    with pytest.raises(MeshReadError, match=r"folder\.obj: not a file"):
        (tmp_path / "folder.obj").mkdir()
        load_mesh(tmp_path / "folder.obj")


# ------------------------------------------------------------------------------- normalisation


def test_normalize_to_unit_cube_centres_and_scales() -> None:
    box = trimesh.creation.box(extents=(4.0, 2.0, 1.0))
    box.apply_translation((10.0, -3.0, 7.0))
    out = normalize_to_unit_cube(box, margin=0.1)
    np.testing.assert_allclose(out.bounds, [[-0.4, -0.2, -0.1], [0.4, 0.2, 0.1]], atol=1e-12)
    np.testing.assert_allclose(box.bounds[0], [8.0, -4.0, 6.5])  # input untouched
    assert normalize_to_unit_cube(box).extents.max() == pytest.approx(1.0)


def test_normalize_rejects_degenerate_meshes() -> None:
    flat_point = trimesh.Trimesh(vertices=np.zeros((3, 3)), faces=[[0, 1, 2]], process=False)
    with pytest.raises(ValueError, match="degenerate"):
        normalize_to_unit_cube(flat_point)
    with pytest.raises(ValueError, match="without vertices"):
        normalize_to_unit_cube(trimesh.Trimesh())
    with pytest.raises(ValueError, match="margin"):
        normalize_to_unit_cube(trimesh.creation.box(), margin=0.5)

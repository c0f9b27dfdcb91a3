"""Synthetic shapes exported in the Objaverse/Shap-E layout: files, re-reading, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

import genlab.data.cli as data_cli
import genlab.data.synthetic_export as synthetic_export
from genlab.data.cameras import read_camera_json
from genlab.data.captions import read_captions_csv, read_metadata_json
from genlab.data.point_clouds import read_point_cloud
from genlab.data.synthetic_export import export_objaverse_layout, orbit_cameras
from genlab.data.synthetic_shapes import generate
from genlab.geometry.rasterize import render_view

ARGS = dict(
    classes=("sphere", "torus"), num_per_class=2, num_views=4, image_size=32, num_points=512
)
IDS = ["sphere_0000", "sphere_0001", "torus_0000", "torus_0001"]
VIEWS = ["000", "001", "002", "003"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_objaverse_layout(tmp_path_factory.mktemp("export") / "synthetic", **ARGS)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_writes_every_file_of_the_layout_and_nothing_else(exported: Path) -> None:
    expected = {"captions.csv", "metadata.json"}
    for object_id in IDS:
        expected |= {f"meshes/{object_id}.obj", f"points/{object_id}.npy"}
        for view in VIEWS:
            expected |= {
                f"images/{object_id}/{view}.png",
                f"normals/{object_id}/{view}.png",
                f"cameras/{object_id}/{view}.json",
            }
    assert set(file_hashes(exported)) == expected
    # the temporary folder was renamed into place: nothing else beside it
    assert [p.name for p in exported.parent.iterdir()] == ["synthetic"]


def test_meshes_load_and_lie_in_the_unit_cube(exported: Path) -> None:
    for object_id in IDS:
        mesh = trimesh.load(exported / "meshes" / f"{object_id}.obj", process=False)
        assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 100
        assert mesh.bounds[0].min() >= -0.5 and mesh.bounds[1].max() <= 0.5
        assert mesh.is_watertight


def test_point_clouds_lie_on_the_mesh_surface_with_one_colour(exported: Path) -> None:
    colors_seen = []
    for object_id in IDS:
        raw = np.load(exported / "points" / f"{object_id}.npy")
        assert raw.shape == (512, 6) and raw.dtype == np.float32
        points, colors = read_point_cloud(exported / "points" / f"{object_id}.npy")
        assert colors is not None and np.all((colors >= 0) & (colors <= 1))
        assert np.ptp(colors, axis=0).max() == 0  # one colour per object
        colors_seen.append(tuple(colors[0]))
        mesh = trimesh.load(exported / "meshes" / f"{object_id}.obj", process=False)
        _, distance, _ = trimesh.proximity.closest_point(mesh, points)
        assert distance.max() < 1e-5
        # spread over the surface, not clumped: the cloud spans most of the mesh's box
        assert np.all(np.ptp(points, axis=0) > 0.8 * mesh.extents)
    assert len(set(colors_seen)) == len(IDS)


def test_renders_match_a_rerender_of_the_mesh_from_the_saved_camera(exported: Path) -> None:
    for object_id in IDS:
        mesh = trimesh.load(exported / "meshes" / f"{object_id}.obj", process=False)
        color = tuple(
            int(round(c * 255)) for c in np.load(exported / "points" / f"{object_id}.npy")[0, 3:]
        )
        for view in VIEWS:
            image = np.asarray(Image.open(exported / "images" / object_id / f"{view}.png"))
            normal = np.asarray(Image.open(exported / "normals" / object_id / f"{view}.png"))
            assert image.shape == normal.shape == (32, 32, 4)
            camera = read_camera_json(exported / "cameras" / object_id / f"{view}.json")
            again = render_view(mesh, camera, color=color)
            np.testing.assert_array_equal(image, again.rgba())
            np.testing.assert_array_equal(normal, again.normal_rgba())
            mask = image[..., 3] == 255
            assert mask.any() and not mask.all() and set(np.unique(image[..., 3])) <= {0, 255}
            # the normal map holds unit world-space normals where the object is
            decoded = normal[mask][:, :3].astype(np.float64) / 255.0 * 2.0 - 1.0
            np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=0.03)


def test_cameras_round_trip_on_the_documented_orbit(exported: Path) -> None:
    cameras = orbit_cameras(4, distance=2.0, fov_deg=40.0, image_size=32)
    for v, view in enumerate(VIEWS):
        camera = read_camera_json(exported / "cameras" / "torus_0001" / f"{view}.json")
        assert camera == cameras[v]
        assert (camera.width, camera.height) == (32, 32)
        elevation, azimuth, distance = camera.elevation_azimuth_distance()
        assert azimuth == pytest.approx(90.0 * v, abs=1e-9)
        assert elevation == pytest.approx(20.0 + 15.0 * math.sin(math.pi * v / 2), abs=1e-9)
        assert distance == pytest.approx(2.0)


def test_captions_and_metadata(exported: Path) -> None:
    data = generate(["sphere", "torus"], 2, 32, 0)
    with open(exported / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    # interleaved like generate(): sphere 0, torus 0, sphere 1, torus 1
    order = ["sphere_0000", "torus_0000", "sphere_0001", "torus_0001"]
    assert rows == [
        ["object_id", "caption"],
        *[[i, c] for i, c in zip(order, data.captions, strict=True)],
    ]
    assert read_captions_csv(exported / "captions.csv") == dict(
        zip(order, data.captions, strict=True)
    )
    links = read_metadata_json(exported / "metadata.json")
    assert links == {f"images/{i}/{v}.png": i for i in IDS for v in VIEWS}
    text = (exported / "metadata.json").read_text(encoding="utf-8")
    metadata = json.loads(text)
    assert text == json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    assert metadata["generator"]["num_views"] == 4 and metadata["images"][0] == {
        "camera_file_name": "cameras/sphere_0000/000.json",
        "file_name": "images/sphere_0000/000.png",
        "normal_file_name": "normals/sphere_0000/000.png",
        "object_id": "sphere_0000",
        "view": "000",
    }


def test_same_arguments_give_byte_identical_files(exported: Path, tmp_path: Path) -> None:
    again = export_objaverse_layout(tmp_path / "again", **ARGS)
    assert file_hashes(again) == file_hashes(exported)
    other = export_objaverse_layout(tmp_path / "other", **{**ARGS, "seed": 1})
    assert (
        file_hashes(other)["points/sphere_0000.npy"]
        != file_hashes(exported)["points/sphere_0000.npy"]
    )


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    small = {**ARGS, "classes": ("box",), "num_per_class": 1, "num_views": 1}
    export_objaverse_layout(out, **small)
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out is not empty \(pass overwrite=True"):
        export_objaverse_layout(out, **small)
    assert (out / "stale.txt").read_text() == "old"
    export_objaverse_layout(out, overwrite=True, **small)
    assert not (out / "stale.txt").exists() and (out / "meshes" / "box_0000.obj").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_export_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(synthetic_export, "render_view", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        export_objaverse_layout(tmp_path / "out", **ARGS)
    assert list(tmp_path.iterdir()) == []


def test_rejects_unknown_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown shape classes \['teapot'\]"):
        export_objaverse_layout(tmp_path / "out", classes=("teapot",))


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--classes", "cone", "--num-per-class", "1", "--num-views", "2"]
    data_cli.main(["export-synthetic", *argv, "--image-size", "16", "--num-points", "64"])
    assert capsys.readouterr().out.strip() == str(out)
    assert np.load(out / "points" / "cone_0000.npy").shape == (64, 6)
    assert sorted(p.name for p in (out / "images" / "cone_0000").iterdir()) == [
        "000.png",
        "001.png",
    ]

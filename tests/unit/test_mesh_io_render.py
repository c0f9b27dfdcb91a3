"""Saving meshes (all formats, atomic) and preview pictures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from genlab.data.meshes import load_mesh, normalize_to_unit_cube
from genlab.geometry.marching_cubes import extract_mesh
from genlab.geometry.mesh_io import SAVE_FORMATS, save_mesh
from genlab.geometry.render import image_grid, render_mesh_preview
from genlab.geometry.voxelize import voxelize_mesh


@pytest.fixture(scope="module")
def voxel_sphere(shared_testdata: Path) -> trimesh.Trimesh:
    """sphere.ply -> unit cube -> 32^3 voxels -> marching cubes."""
    path = shared_testdata / "trimesh" / "sphere.ply"
    if not path.is_file():
        pytest.skip(f"sphere mesh not present: {path}")
    sphere = normalize_to_unit_cube(load_mesh(path), margin=0.1)
    mesh = extract_mesh(voxelize_mesh(sphere, 32))
    assert mesh is not None and mesh.is_watertight
    return mesh


# ------------------------------------------------------------------------------------ save_mesh


def test_obj_round_trip_keeps_vertices_and_volume(
    voxel_sphere: trimesh.Trimesh, tmp_path: Path
) -> None:
    path = save_mesh(voxel_sphere, tmp_path / "deep" / "er" / "sphere.obj")
    assert path == tmp_path / "deep" / "er" / "sphere.obj" and path.is_file()
    loaded = trimesh.load(path, process=False, force="mesh")
    assert len(loaded.vertices) == len(voxel_sphere.vertices)
    assert len(loaded.faces) == len(voxel_sphere.faces)
    assert loaded.volume == pytest.approx(voxel_sphere.volume, rel=1e-5)
    # a 0.4-radius ball voxelised at 32^3 is a bit fatter (surface voxels count as inside)
    assert 4 / 3 * np.pi * 0.4**3 < loaded.volume < 1.2 * 4 / 3 * np.pi * 0.4**3


@pytest.mark.parametrize("suffix", sorted(SAVE_FORMATS))
def test_every_format_is_written_and_reread(
    voxel_sphere: trimesh.Trimesh, tmp_path: Path, suffix: str
) -> None:
    path = save_mesh(voxel_sphere, tmp_path / f"mesh{suffix}")
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    reread = load_mesh(path)
    assert len(reread.faces) == len(voxel_sphere.faces)
    assert len(reread.vertices) == len(voxel_sphere.vertices)  # STL soup is welded again
    assert reread.is_watertight
    assert reread.volume == pytest.approx(voxel_sphere.volume, rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mesh{suffix}"]  # no temp files


def test_uppercase_extension_and_overwrite(voxel_sphere: trimesh.Trimesh, tmp_path: Path) -> None:
    path = tmp_path / "MESH.PLY"
    path.write_text("old content")
    save_mesh(voxel_sphere, path)
    assert path.read_bytes().startswith(b"ply")


def test_unknown_extension_lists_supported(voxel_sphere: trimesh.Trimesh, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.fbx'.*\.obj, \.ply, \.glb, \.off, \.stl"):
        save_mesh(voxel_sphere, tmp_path / "mesh.fbx")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_partial_file(
    voxel_sphere: trimesh.Trimesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "mesh.obj"
    target.write_text("previous")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_mesh(voxel_sphere, target)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mesh.obj"]


# ---------------------------------------------------------------------------------- previews


def _is_flat(image: Image.Image) -> bool:
    extrema = image.convert("RGB").getextrema()
    return all(lo == hi for lo, hi in extrema)


def test_preview_png_round_trip(voxel_sphere: trimesh.Trimesh, tmp_path: Path) -> None:
    image = render_mesh_preview(voxel_sphere, size=200, title="sphere")
    assert image.size == (200, 200) and image.mode == "RGB"
    path = tmp_path / "preview.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.size == (200, 200)
        pixels = np.asarray(reopened.convert("RGB"), dtype=np.int16)
    assert not _is_flat(Image.fromarray(pixels.astype(np.uint8)))
    shape = np.abs(pixels - 255).sum(axis=-1) > 30  # non-background
    assert 0.15 < shape.mean() < 0.7  # a 0.8-wide ball in a unit-cube view
    ys, xs = np.nonzero(shape[20:])  # below the title
    assert abs(xs.mean() - 100) < 12 and abs(ys.mean() + 20 - 100) < 15  # centred
    shades = {tuple(p) for p in pixels[shape][::7]}
    assert len(shades) > 20  # Lambert shading, not a silhouette


def test_previews_are_comparable_across_meshes() -> None:
    small = render_mesh_preview(trimesh.creation.box(extents=(0.2, 0.2, 0.2)), size=128)
    large = render_mesh_preview(trimesh.creation.box(extents=(0.8, 0.8, 0.8)), size=128)
    area = [(np.asarray(im).min(axis=-1) < 250).mean() for im in (small, large)]
    assert area[1] / area[0] == pytest.approx(16.0, rel=0.25)  # fixed view: area ~ size^2


def test_front_faces_are_lit_from_above() -> None:
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    inverted = box.copy()
    inverted.invert()
    for mesh in (box, inverted):  # winding must not matter
        pixels = np.asarray(render_mesh_preview(mesh, size=128), dtype=np.float64)
        top = pixels[40, 64].sum()  # on the top face of the box (z up)
        left, right = pixels[65, 45].sum(), pixels[65, 85].sum()  # on the side faces
        assert top > right + 30 and right > left + 10 and left < 600  # left is not background
    y_up = np.asarray(render_mesh_preview(box, size=128, vertical_axis="y"), dtype=np.float64)
    assert y_up[40, 64].sum() > y_up[65, 85].sum() + 30 > y_up[65, 45].sum() + 40


@pytest.mark.parametrize("mesh", [None, trimesh.Trimesh()])
def test_no_surface_picture(mesh: trimesh.Trimesh | None) -> None:
    image = render_mesh_preview(mesh, size=128)
    assert image.size == (128, 128)
    assert not _is_flat(image)  # the "no surface" text
    box = render_mesh_preview(trimesh.creation.box(extents=(0.5, 0.5, 0.5)), size=128)
    assert (np.asarray(image).min(axis=-1) < 250).mean() < 0.2 * (
        np.asarray(box).min(axis=-1) < 250
    ).mean()


def test_20k_faces_render_quickly() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.45)
    assert len(sphere.faces) == 20480
    broken = trimesh.Trimesh(sphere.vertices, sphere.faces[::-1].copy(), process=False)
    broken.faces[::2] = broken.faces[::2, ::-1]  # inconsistent winding: every face drawn
    for mesh in (sphere, broken):
        start = time.perf_counter()
        image = render_mesh_preview(mesh)
        assert time.perf_counter() - start < 1.5  # typically 0.2-0.4 s
        assert not _is_flat(image)


def test_preview_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vertical_axis"):
        render_mesh_preview(trimesh.creation.box(), vertical_axis="w")
    with pytest.raises(ValueError, match="size"):
        render_mesh_preview(trimesh.creation.box(), size=4)


# --------------------------------------------------------------------------------- image_grid


def test_image_grid_layout_resize_and_labels() -> None:
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    blue = Image.new("RGB", (80, 60), (0, 0, 255))
    green = Image.new("RGBA", (40, 30), (0, 255, 0, 255))
    grid = image_grid([red, blue, green], ncols=2, pad=4)
    assert grid.size == (2 * 44 + 4, 2 * 34 + 4)
    assert grid.getpixel((4, 4)) == (255, 0, 0)
    assert grid.getpixel((48 + 39, 4 + 29)) == (0, 0, 255)  # resized to 40x30
    assert grid.getpixel((4, 38)) == (0, 255, 0)  # second row
    assert grid.getpixel((48, 38)) == (255, 255, 255)  # empty cell

    labelled = image_grid([red, blue, green], ncols=3, labels=["a", "b", "c" * 200], pad=4)
    assert labelled.size[0] == 3 * 44 + 4 and labelled.size[1] > 30 + 8
    caption = np.asarray(labelled)[38:, :]
    assert (caption.min(axis=-1) < 128).any()  # dark caption text under the tiles
    assert labelled.getpixel((4, 4)) == (255, 0, 0)


def test_image_grid_default_columns_and_errors() -> None:
    tiles = [Image.new("RGB", (10, 10), (i * 20, 0, 0)) for i in range(5)]
    assert image_grid(tiles, pad=0).size == (30, 20)  # ceil(sqrt(5)) = 3 columns
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])
    with pytest.raises(ValueError, match="2 labels for 5 images"):
        image_grid(tiles, labels=["a", "b"])


def test_captions_draw_turkish_letters_not_missing_glyph_boxes() -> None:
    from genlab.geometry.render import caption_font

    font = caption_font()

    def bitmap(text: str) -> np.ndarray:
        image = Image.new("L", (40, 30), 0)
        ImageDraw.Draw(image).text((4, 4), text, fill=255, font=font)
        return np.asarray(image)

    letters = [bitmap(c) for c in "ÇŞĞİıC"]
    assert all(b.any() for b in letters)
    # a font without these letters draws the same "missing" box for each of them
    for i in range(len(letters)):
        for j in range(i + 1, len(letters)):
            assert not np.array_equal(letters[i], letters[j])


def test_sample_file_names_keep_turkish_words_readable() -> None:
    from genlab.samples import Sample

    assert Sample("Büyük bir küre, Çini kâse", 3).stem == "buyuk_bir_kure_cini_kase_03"
    assert Sample("İznik ışığı", 0).stem == "iznik_isigi_00"
    ink = Sample("水墨画", 1).stem
    assert ink.startswith("prompt_") and ink == Sample("水墨画", 1).stem != Sample("山水画", 1).stem
    assert Sample("", 2).stem == "unconditional_02"

"""CaptionedMeshDataModule: layouts, UTF-8 Turkish text end to end, caching, augmentation, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from genlab.data.captioned_meshes import (
    CaptionedMeshDataModule,
    PointVoxelAugmentation,
    SyntheticCaptionedMeshDataModule,
    transform_voxels,
)
from genlab.data.synthetic_export import STYLE_PHRASES
from genlab.data.validation import DataValidationError
from genlab.geometry.voxelize import voxel_centers, world_to_index

CAPTION_TR = "Çini desenli kırmızı vazo, İznik motifleri"
STYLE_TR = "Selçuklu geometrik yıldız deseni"


def _box(extents, center=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=extents)
    mesh.apply_translation(center)
    return mesh


def _write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def mesh_folder(tmp_path: Path) -> Path:
    root = tmp_path / "motifs"
    root.mkdir()
    _box([2.0, 1.0, 0.5], center=[5.0, 0, 0]).export(root / "vazo.obj")  # not in the cube
    trimesh.creation.icosphere(subdivisions=2, radius=3.0).export(root / "küre.ply")
    trimesh.creation.cylinder(radius=1.0, height=2.0).export(root / "silindir.stl")
    _write_csv(
        root / "captions.csv",
        [
            ["file_name", "caption", "style"],
            ["vazo.obj", CAPTION_TR, STYLE_TR],
            ["küre.ply", "İğne oyası süslü küre", ""],
            ["silindir.stl", 'a plain cylinder, "quoted"', "Osmanlı lale deseni"],
        ],
        encoding="utf-8-sig",  # with a byte-order mark, as Excel writes it
    )
    return root


def _module(root: Path, tmp_path: Path, **kwargs) -> CaptionedMeshDataModule:
    defaults = dict(
        num_points=256,
        voxel_size=16,
        val_fraction=0.0,
        test_fraction=0.0,
        batch_size=3,
        cache_dir=tmp_path / "cache",
    )
    return CaptionedMeshDataModule(root, **{**defaults, **kwargs})


def test_mesh_folder_batches_keep_turkish_text_and_align_points_with_voxels(
    mesh_folder: Path, tmp_path: Path
) -> None:
    dm = _module(mesh_folder, tmp_path)
    report = dm.validate()
    assert report.ok, report.summary()
    assert report.counts["objects"] == 3 and report.counts["styles"] == 2
    dm.setup()
    batch = next(iter(dm.val_dataloader() if dm.splits["val"] else dm.train_dataloader()))
    by_id = {i: n for n, i in enumerate(batch["object_id"])}
    assert set(by_id) == {"vazo", "küre", "silindir"}
    vazo = by_id["vazo"]
    # byte-identical UTF-8 text
    assert batch["text"][vazo].encode("utf-8") == CAPTION_TR.encode("utf-8")
    assert batch["style_text"][vazo].encode("utf-8") == STYLE_TR.encode("utf-8")
    assert batch["style_text"][by_id["küre"]] == ""
    assert batch["text"][by_id["silindir"]] == 'a plain cylinder, "quoted"'
    assert batch["points"].shape == (3, 256, 3) and batch["points"].dtype == torch.float32
    assert batch["voxels"].shape == (3, 1, 16, 16, 16) and batch["voxels"].dtype == torch.float32
    # normalised into the unit cube with a voxel of margin: the 2 x 1 x 0.5 box -> 0.875 long
    pts = batch["points"][vazo]
    assert pts.abs().max() <= 0.5 - 1 / 16 + 1e-6
    np.testing.assert_allclose(
        (pts.max(0).values - pts.min(0).values).numpy(), [0.875, 0.4375, 0.21875], atol=0.02
    )
    # points and voxels share the frame: the points lie in (or next to) occupied voxels
    _assert_points_in_voxels(batch["points"], batch["voxels"], min_fraction=0.98)
    occupancy = batch["voxels"][vazo].mean().item()
    assert occupancy == pytest.approx(14 * 7 * 4 / 16**3, rel=0.35)  # solid, not a shell


def _assert_points_in_voxels(points: torch.Tensor, voxels: torch.Tensor, min_fraction: float):
    size = voxels.shape[-1]
    for pts, grid in zip(points, voxels, strict=True):
        # a surface point may sit on a boundary: accept the voxel or a 6-neighbour
        dilated = torch.nn.functional.max_pool3d(grid[None], 3, stride=1, padding=1)[0, 0]
        idx = np.clip(np.floor(world_to_index(pts.numpy(), size) + 0.5), 0, size - 1).astype(int)
        inside = dilated[idx[:, 0], idx[:, 1], idx[:, 2]].numpy()
        assert inside.mean() >= min_fraction, inside.mean()


def test_cache_is_written_outside_the_data_and_reused(
    mesh_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in mesh_folder.iterdir())
    _module(mesh_folder, tmp_path).validate()
    cached = sorted((tmp_path / "cache" / "captioned_meshes").glob("*.npz"))
    assert len(cached) == 3
    assert sorted(p.name for p in mesh_folder.iterdir()) == before
    # a second module reads the cache and builds nothing
    import genlab.data.captioned_meshes as module

    built: list[str] = []
    real = module.prepare_object
    monkeypatch.setattr(
        module,
        "prepare_object",
        lambda obj, *a, **k: built.append(obj.object_id) or real(obj, *a, **k),
    )
    again = _module(mesh_folder, tmp_path)
    assert again.validate().ok and built == []
    again.setup()
    assert again.dataset("train")[0]["voxels"].sum() > 0 and built == []
    # a changed file gets a new key: it is read again (and here reported as broken)
    (mesh_folder / "vazo.obj").write_text("garbage")
    report = _module(mesh_folder, tmp_path, on_bad_file="skip").validate()
    assert built == ["vazo"] and "vazo.obj" in report.summary()
    with pytest.raises(ValueError, match="inside the data folder"):
        _module(mesh_folder, tmp_path, cache_dir=mesh_folder / ".cache").validate()


def test_objaverse_layout_with_points_and_metadata_json(tmp_path: Path) -> None:
    root = tmp_path / "objs"
    (root / "meshes").mkdir(parents=True)
    (root / "points").mkdir()
    for i in range(4):
        mesh = _box([0.6, 0.4, 0.2 + 0.1 * i])
        mesh.export(root / "meshes" / f"obj_{i}.obj")
        pts, _ = trimesh.sample.sample_surface(mesh, 500, seed=i)
        np.save(root / "points" / f"obj_{i}.npy", pts.astype(np.float32))
    records = [
        {
            "object_id": f"obj_{i}",
            "caption": f"{CAPTION_TR} {i}",
            "style": STYLE_TR if i % 2 else None,
        }
        for i in range(4)
    ]
    (root / "metadata.json").write_text(
        json.dumps({"objects": records}, ensure_ascii=False), encoding="utf-8"
    )
    dm = CaptionedMeshDataModule(
        root, num_points=128, voxel_size=16, val_fraction=0.25, test_fraction=0.25,
        batch_size=4, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert dm.validate().ok
    assert dm.resolved_layout() == "objaverse"
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 2, "val": 1, "test": 1}
    item = dm.dataset("test")[0]
    i = int(item["object_id"][-1])
    assert item["text"] == f"{CAPTION_TR} {i}"
    assert item["style_text"] == (STYLE_TR if i % 2 else "")
    # the stored points were moved by the same normalisation as the mesh: the 0.6-long box
    # edge becomes 1 - 2/16 long
    extent = item["points"].max(0).values - item["points"].min(0).values
    assert extent[0].item() == pytest.approx(0.875, abs=0.03)
    _assert_points_in_voxels(item["points"][None], item["voxels"][None], min_fraction=0.97)


def test_windows_1254_captions_fail_with_file_and_advice(mesh_folder: Path, tmp_path: Path) -> None:
    _write_csv(
        mesh_folder / "captions.csv",
        [["object_id", "caption"], ["vazo", CAPTION_TR], ["küre", "a"], ["silindir", "b"]],
        encoding="cp1254",
    )
    dm = _module(mesh_folder, tmp_path)
    report = dm.validate()
    assert not report.ok and not dm.objects
    text = report.summary()
    assert "captions.csv:2: not valid UTF-8" in text and "save the file as UTF-8" in text
    with pytest.raises(DataValidationError, match=r"captions.csv:2: not valid UTF-8"):
        dm.setup()


def test_bad_files_are_skipped_or_stop(mesh_folder: Path, tmp_path: Path) -> None:
    (mesh_folder / "kırık.obj").write_text("v 0 0 0\nv 1 0 0\n")  # no faces
    (mesh_folder / "yalnız.obj").write_bytes((mesh_folder / "vazo.obj").read_bytes())
    with (mesh_folder / "captions.csv").open("a", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([["kırık.obj", "broken", ""], ["ghost.obj", "nobody", ""]])
    strict = _module(mesh_folder, tmp_path)
    with pytest.raises(DataValidationError, match="kırık.obj"):
        strict.setup()
    lenient = _module(mesh_folder, tmp_path, on_bad_file="skip")
    report = lenient.validate()
    lenient.setup()
    assert sorted(o.object_id for o in lenient.objects) == ["küre", "silindir", "vazo"]
    assert [p.path for p in lenient.skipped] == ["kırık", "yalnız"]
    assert "no caption for object 'yalnız'" in lenient.skipped[1].reason
    assert "no faces" in lenient.skipped[0].reason
    assert "caption for unknown object 'ghost'" in report.summary()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        CaptionedMeshDataModule(tmp_path, layout="shapenet")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CaptionedMeshDataModule(tmp_path / "missing").validate()
    with pytest.raises(ValueError, match=r"augment.scale must be \[lo, hi\]"):
        CaptionedMeshDataModule(tmp_path, augment={"scale": [1.2, 0.8]})


# ------------------------------------------------------------------------------ augmentation


def test_voxel_transform_matches_point_transform() -> None:
    size = 16
    centres = torch.from_numpy(voxel_centers(size)).float()
    # an L-shaped, asymmetric solid
    grid = (centres[..., 0] > -0.3) & (centres[..., 0] < 0.35) & (centres[..., 1].abs() < 0.1)
    grid |= (centres[..., 0].abs() < 0.1) & (centres[..., 1] > 0) & (centres[..., 1] < 0.3)
    grid &= centres[..., 2].abs() < 0.2
    voxels = grid.float()[None]
    quarter = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    rotated = transform_voxels(voxels, quarter)
    # a 90-degree turn about z maps the grid exactly: (x, y) -> (-y, x)
    expected = torch.rot90(voxels, k=1, dims=(1, 2))
    assert torch.equal(rotated, expected)
    assert torch.equal(transform_voxels(voxels, torch.eye(3, dtype=torch.float64)), voxels)
    # scaling a ball of radius 0.4 by 0.8 gives the ball of radius 0.32
    radius = centres.norm(dim=-1)
    big, small = (radius < 0.4).float()[None], (radius < 0.32).float()[None]
    scaled = transform_voxels(big, 0.8 * torch.eye(3, dtype=torch.float64))
    iou = (scaled * small).sum() / ((scaled + small) > 0).sum()
    assert iou.item() > 0.9


def test_augmentation_keeps_points_and_voxels_aligned(mesh_folder: Path, tmp_path: Path) -> None:
    augment = {"rotation_deg": 30, "scale": [0.8, 1.2], "jitter": 0.05, "voxels": True}
    dm = _module(mesh_folder, tmp_path, augment=augment, voxel_size=24)
    dm.setup()
    torch.manual_seed(0)
    train = dm.dataset("train")
    for _ in range(3):
        item = train[0]
        _assert_points_in_voxels(item["target_points"][None], item["voxels"][None], 0.95)
        noise = item["points"] - item["target_points"]
        assert noise.std().item() == pytest.approx(0.05, rel=0.15)
    # the clean target is an isotropic scale of a z-rotation of the stored points
    plain = _module(mesh_folder, tmp_path, voxel_size=24)
    plain.setup()
    base = plain.dataset("train")[0]
    torch.manual_seed(1)
    moved = train[0]["target_points"]
    gram_base = base["points"][:, :2].norm(dim=1)
    ratio = moved[:, :2].norm(dim=1) / gram_base.clamp(min=1e-6)
    assert ratio.std().item() < 1e-4 and 0.8 - 1e-6 <= ratio.mean().item() <= 1.2 + 1e-6
    z_ratio = moved[:, 2] / base["points"][:, 2]
    assert z_ratio[base["points"][:, 2].abs() > 0.01].sub(ratio.mean()).abs().max() < 1e-4
    # voxels left alone: aligned with the unaugmented target only
    frozen = PointVoxelAugmentation(rotation_deg=30, scale=[1.0, 1.0], voxels=False)
    _, clean, vox = frozen(base["points"], base["voxels"], torch.Generator().manual_seed(3))
    assert torch.equal(vox, base["voxels"])
    angle = math.atan2(clean[0, 1], clean[0, 0]) - math.atan2(
        base["points"][0, 1], base["points"][0, 0]
    )
    assert abs(math.remainder(angle, 2 * math.pi)) <= math.radians(30) + 1e-5


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_captioned_is_generated_into_the_cache(tmp_path: Path) -> None:
    export = dict(classes=["sphere", "box"], num_per_class=3, voxel_size=16, num_views=1,
                  image_size=16, num_points=256)  # fmt: skip
    dm = SyntheticCaptionedMeshDataModule(
        export=export, cache_dir=tmp_path / "cache", num_points=128, voxel_size=16,
        val_fraction=0.0, test_fraction=0.0, batch_size=6,
    )  # fmt: skip
    assert dm.root is not None and dm.root.is_relative_to(tmp_path / "cache")
    assert dm.validate().ok
    with (dm.root / "captions.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["object_id"] for r in rows) == [
        "box_0000", "box_0001", "box_0002", "sphere_0000", "sphere_0001", "sphere_0002"
    ]  # fmt: skip
    assert [r["style"] for r in rows] == [STYLE_PHRASES[n % 6] for n in range(6)]
    assert rows[0]["style"] == "Selçuklu geometrik yıldız deseni" and rows[5]["style"] == ""
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    styles = dict(zip(batch["object_id"], batch["style_text"], strict=True))
    assert styles == {r["object_id"]: r["style"] for r in rows}
    assert batch["voxels"].shape == (6, 1, 16, 16, 16) and batch["voxels"].sum() > 0
    # deterministic: a second module finds the same export and the same batches
    again = SyntheticCaptionedMeshDataModule(
        export=export, cache_dir=tmp_path / "cache", num_points=128, voxel_size=16,
        val_fraction=0.0, test_fraction=0.0, batch_size=6,
    )  # fmt: skip
    assert again.root == dm.root
    again.setup()
    assert torch.equal(again.dataset("train")[0]["points"], dm.dataset("train")[0]["points"])


def test_state_dict_restores_the_training_order(mesh_folder: Path, tmp_path: Path) -> None:
    dm = _module(mesh_folder, tmp_path, batch_size=1)
    dm.setup()
    state = dm.state_dict()
    first = [b["object_id"][0] for b in dm.train_dataloader()]
    dm.load_state_dict(state)
    assert [b["object_id"][0] for b in dm.train_dataloader()] == first


def test_caption_readers_accept_id_column_and_name_bad_json(tmp_path: Path) -> None:
    from genlab.data.captions import (
        CaptionError,
        read_caption_records_csv,
        read_caption_records_json,
    )

    path = tmp_path / "captions.csv"
    _write_csv(path, [["object_id", "caption"], ["vazo", CAPTION_TR]])
    assert read_caption_records_csv(path) == {"vazo": {"caption": CAPTION_TR}}
    _write_csv(path, [["name", "caption"], ["vazo", CAPTION_TR]])
    with pytest.raises(CaptionError, match=r"captions.csv:1: expected a header with 'caption'"):
        read_caption_records_csv(path)
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"vazo": {"caption": CAPTION_TR, "style": STYLE_TR}, "kase": "bowl"},
                               ensure_ascii=False), encoding="utf-8")  # fmt: skip
    assert read_caption_records_json(meta) == {
        "vazo": {"caption": CAPTION_TR, "style": STYLE_TR},
        "kase": {"caption": "bowl", "style": ""},
    }
    meta.write_text(json.dumps({"objects": [{"object_id": "a", "caption": 3}]}), encoding="utf-8")
    with pytest.raises(CaptionError, match=r"metadata.json: objects\[0\]: missing, empty"):
        read_caption_records_json(meta)


def test_export_cli_writes_the_style_column(tmp_path: Path) -> None:
    from genlab.data.cli import main

    out = tmp_path / "export"
    args = ["export-synthetic", "--out", str(out), "--classes", "box", "--num-per-class", "2",
            "--voxel-size", "16", "--num-views", "1", "--image-size", "16", "--num-points", "64"]  # fmt: skip
    assert main([*args, "--styles"]) == 0
    lines = (out / "captions.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "object_id,caption,style"
    assert lines[1].endswith(",Selçuklu geometrik yıldız deseni")
    assert json.loads((out / "metadata.json").read_text())["generator"]["styles"] is True
    plain = tmp_path / "plain"
    assert main([*args[:2], str(plain), *args[3:]]) == 0
    assert (plain / "captions.csv").read_text().splitlines()[0] == "object_id,caption"
    assert "styles" not in json.loads((plain / "metadata.json").read_text())["generator"]

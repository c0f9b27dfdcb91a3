"""validate() of the voxel data sources: counts, splits and every bad mesh with its reason.

The mesh folders mix quirky files from ../shared/testdata/trimesh with boxes made here and bad
files written by the tests, in the ModelNet and the ShapeNetCore layouts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import trimesh
from hydra.utils import instantiate

import genlab.data.mesh_folder as mesh_folder
from genlab.data.mesh_folder import MeshFolderVoxels, detect_layout
from genlab.data.meshes import load_mesh
from genlab.data.synthetic_shapes import SyntheticShapes
from genlab.data.validation import DataValidationError, Problem
from genlab.data.voxel_datamodule import VoxelDataModule
from tests.conftest import shared_path
from tests.helpers import compose_config

R = 16

TRUNCATED_OFF = "OFF\n8 12 0\n0 0 0\n1 0 0\n"
NAN_OFF = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\nnan 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
FLAT_OFF = "OFF\n3 1 0\n1 1 1\n1 1 1\n1 1 1\n3 0 1 2\n"

# (path under the root, reason) of every bad file of the `modelnet_mini` folder, in report order
BAD = [
    ("ball/test/nan.off:6", "non-finite vertex coordinate in 'nan 0 1'"),
    ("ball/train/points_ascii.ply", "no faces (only PointCloud geometry)"),
    (
        "box/test/truncated.off:4",
        "file truncated: header declares 8 vertices and 12 faces, "
        "found 2 vertex lines and 0 face lines",
    ),
    ("box/train/box_0.off", "duplicate id 'box/train/box_0' (also box/train/box_0.obj)"),
    ("box/train/empty.obj", "no faces (no geometry)"),
    (
        "box/train/flat.off",
        "cannot normalise a degenerate mesh: bounding box extents (0.0, 0.0, 0.0)",
    ),
]
GOOD = [
    "ball/test/ballA.off",
    "ball/train/ballA.off",
    "ball/train/ballB.off",
    "ball/train/wallhole.obj",
    "box/test/box_3.off",
    "box/train/box_0.obj",
    "box/train/box_1.ply",
    "box/train/box_2.stl",
    "box/train/busted.STL",
    "box/train/soup.stl",
]


def box(i: int) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(1.0, 0.6 + 0.1 * i, 0.4 + 0.05 * i))


def write_box(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    box(i).export(path)
    return path


@pytest.fixture
def modelnet_mini(tmp_path: Path, shared_testdata: Path) -> Path:
    """ModelNet layout: 2 categories, 16 mesh files of which 6 are bad (see BAD)."""
    root = tmp_path / "ModelNetMini"
    quirky = shared_path(shared_testdata, "trimesh")
    copies = {
        "ball/train": ["ballA.off", "ballB.off", "wallhole.obj", "points_ascii.ply"],
        "ball/test": ["ballA.off"],
        "box/train": ["soup.stl", "busted.STL", "empty.obj"],
    }
    for folder, names in copies.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(shared_path(quirky, name), root / folder / name)
    for i, name in enumerate(["box_0.obj", "box_1.ply", "box_2.stl"]):
        write_box(root / "box/train" / name, i)
    write_box(root / "box/train/box_0.off", 0)  # same id as box_0.obj
    write_box(root / "box/test/box_3.off", 3)
    (root / "box/test/truncated.off").write_text(TRUNCATED_OFF)
    (root / "ball/test/nan.off").write_text(NAN_OFF)
    (root / "box/train/flat.off").write_text(FLAT_OFF)
    return root


def relative(problems: list[Problem], root: Path) -> list[tuple[str, str]]:
    return [(Path(p.path).relative_to(root).as_posix(), p.reason) for p in problems]


def test_validate_lists_every_bad_mesh_with_its_reason(modelnet_mini: Path) -> None:
    src = MeshFolderVoxels(modelnet_mini, voxel_size=R)
    report = src.validate()
    assert report.dataset == "ModelNetMini"
    assert report.counts == {
        "meshes found": 16,
        "usable meshes": 10,
        "categories": 2,
        "ball meshes": 4,
        "box meshes": 6,
    }
    assert report.splits == {"train": 8, "test": 2}
    assert relative(report.problems, modelnet_mini) == BAD
    summary = report.summary()
    assert summary.startswith("data set ModelNetMini: 16 meshes found, 10 usable meshes")
    assert "splits: train 8, test 2" in summary and "6 problem(s):" in summary


def test_error_mode_voxelises_everything_then_lists_all_bad_files(
    modelnet_mini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []

    def spy(path):
        read.append(Path(path).name)
        return load_mesh(path)

    monkeypatch.setattr(mesh_folder, "load_mesh", spy)
    src = MeshFolderVoxels(modelnet_mini, voxel_size=R)  # first pass, no cache
    with pytest.raises(DataValidationError) as info:
        src.load()
    assert len(read) == 15  # every file but the duplicate id, not only up to the first bad one
    message = str(info.value)
    for path, reason in BAD:
        assert f"{modelnet_mini / path}: {reason}" in message
    assert "data.on_bad_file=skip" in message
    dm = VoxelDataModule(src, voxel_size=R)
    with pytest.raises(DataValidationError, match="6 problem"):
        dm.setup()
    report = dm.validate()  # reports, does not raise; the folder's split is kept
    assert not report.ok and report.splits == {"train": 8, "test": 2}
    assert dm.on_bad_file == "error" and dm.skipped == []


class TinyVoxelModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(R**3, 1)
        self.seen: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(len(batch["caption"]))
        logits = self.net(batch["voxels"].flatten(1)).squeeze(1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_skip_mode_trains_on_the_good_meshes(modelnet_mini: Path, tmp_path: Path) -> None:
    src = MeshFolderVoxels(modelnet_mini, voxel_size=R, cache_dir=tmp_path / "cache")
    dm = VoxelDataModule(src, voxel_size=R, val_fraction=0.25, batch_size=4, on_bad_file="skip")
    assert src.on_bad_file == "skip"
    report = dm.validate()
    assert relative(report.problems, modelnet_mini) == BAD
    assert report.splits == {"train": 6, "val": 2, "test": 2}  # as the datamodule splits
    assert relative(dm.skipped, modelnet_mini) == BAD
    dm.setup()
    assert dm.data is not None and sorted(dm.data.sources) == GOOD
    assert dm.data.class_names == ["ball", "box"]
    assert sorted(set(dm.data.captions)) == ["a ball", "a box"]
    assert (dm.data.voxels.reshape(10, -1).mean(1) > 0.01).all()
    model = TinyVoxelModel()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert sum(model.seen) == 6


def test_cached_reload_gives_the_same_report_without_reading_meshes(
    modelnet_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = MeshFolderVoxels(modelnet_mini, voxel_size=R, cache_dir=cache)
    report = first.validate()
    first.on_bad_file = "skip"
    data = first.load()
    assert len(list(cache.glob("meshes_*.npz"))) == 1
    assert len(list(cache.glob("meshes_*.report.json"))) == 1

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(mesh_folder, "load_mesh", no_reading)
    again = MeshFolderVoxels(modelnet_mini, voxel_size=R, cache_dir=cache)
    assert again.validate().to_dict() == report.to_dict()
    with pytest.raises(DataValidationError) as info:
        again.load()
    assert all(f"{modelnet_mini / p}: {r}" in str(info.value) for p, r in BAD)
    again.on_bad_file = "skip"
    cached = again.load()
    assert np.array_equal(cached.voxels, data.voxels) and cached.sources == data.sources
    assert again.skipped == report.problems
    # an edited file invalidates the cache
    (modelnet_mini / "box/train/flat.off").write_text(FLAT_OFF + "\n")
    with pytest.raises(AssertionError, match="read again"):
        MeshFolderVoxels(modelnet_mini, voxel_size=R, cache_dir=cache).validate()


def test_mesh_that_voxelises_to_nothing_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "folder"
    write_box(root / "box/train/a.obj", 0)
    write_box(root / "box/train/b.obj", 1)
    real = mesh_folder.voxelize_mesh

    def blind_to_b(mesh, resolution, fill=True):
        grid = real(mesh, resolution, fill)
        return np.zeros_like(grid) if np.ptp(mesh.vertices[:, 1]) > 0.55 else grid

    monkeypatch.setattr(mesh_folder, "voxelize_mesh", blind_to_b)
    report = MeshFolderVoxels(root, voxel_size=R).validate()
    assert relative(report.problems, root) == [("box/train/b.obj", "voxelises to an empty grid")]
    assert report.counts["usable meshes"] == 1


@pytest.fixture
def shapenet_mini(tmp_path: Path) -> Path:
    """ShapeNetCore layout: 2 chairs, a chair folder without a mesh, 1 table."""
    root = tmp_path / "ShapeNetCore"
    for i, model in enumerate(["1a2b3c", "4d5e6f"]):
        write_box(root / "03001627" / model / "models" / "model_normalized.obj", i)
    (root / "03001627" / "9f9f9f" / "models").mkdir(parents=True)
    write_box(root / "04379243" / "7a7a7a" / "models" / "model_normalized.obj", 3)
    return root


def test_shapenet_layout_scan_and_captions(shapenet_mini: Path, tmp_path: Path) -> None:
    assert detect_layout(shapenet_mini) == "shapenet"
    assert detect_layout(shapenet_mini / "03001627") == "shapenet"
    src = MeshFolderVoxels(shapenet_mini, voxel_size=R, on_bad_file="skip")
    report = src.validate()
    assert report.counts == {
        "meshes found": 4,
        "usable meshes": 3,
        "categories": 2,
        "chair meshes": 2,
        "table meshes": 1,
    }
    assert report.splits == {}  # ShapeNet defines no split
    assert relative(report.problems, shapenet_mini) == [
        (
            "03001627/9f9f9f",
            "no mesh file (expected models/model_normalized.obj or model.obj)",
        )
    ]
    data = src.load()
    assert data.class_names == ["chair", "table"] and data.splits is None
    assert data.captions == ["a chair", "a chair", "a table"]
    assert data.sources[0] == "03001627/1a2b3c/models/model_normalized.obj"
    dm = VoxelDataModule(src, voxel_size=R, val_fraction=0.0, test_fraction=0.0)
    assert dm.validate().splits == {"train": 3, "val": 0, "test": 0}

    # one synset folder as the root, the category given by id or by name
    for categories in (["03001627"], ["chair"], None):
        one = MeshFolderVoxels(
            shapenet_mini / "03001627", voxel_size=R, categories=categories, on_bad_file="skip"
        )
        assert one.load().captions == ["a chair", "a chair"]
    by_name = MeshFolderVoxels(shapenet_mini, voxel_size=R, categories=["table"])
    assert by_name.load().class_names == ["table"]
    with pytest.raises(FileNotFoundError, match="categories \\['sofa'\\] not found"):
        MeshFolderVoxels(shapenet_mini, voxel_size=R, categories=["sofa"]).validate()


@pytest.mark.parametrize("name", ["modelnet40", "modelnet10", "shapenet_chairs"])
def test_named_data_configs_compose_and_name_the_fetch_command(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"data={name}", "model.voxel_size=16"], tmp_path)
    assert cfg.data.dataset._target_ == "genlab.data.mesh_folder.MeshFolderVoxels"
    assert cfg.data.on_bad_file == "error" and cfg.data.val_fraction == 0.1  # from mesh_folder
    assert cfg.data.dataset.root.startswith(str(tmp_path / "data" / name))
    dm = instantiate(cfg.data)
    with pytest.raises(FileNotFoundError, match=f"no such folder; run `genlab-data fetch {name}`"):
        dm.validate()
    with pytest.raises(FileNotFoundError, match=f"genlab-data fetch {name}"):
        dm.prepare_data()


@pytest.mark.parametrize("inner", ["", "ModelNet40"])  # as fetch extracts it / unpacked by hand
def test_modelnet40_config_reads_the_fetched_folder(inner: str, tmp_path: Path) -> None:
    root = tmp_path / "data" / "modelnet40" / inner
    write_box(root / "chair/train/chair_0001.off", 0)
    write_box(root / "chair/train/chair_0002.off", 1)
    write_box(root / "chair/test/chair_0890.off", 2)
    (root / "chair/train/chair_0003.off").write_text(TRUNCATED_OFF)
    (root / ".genlab_source.json").write_text("{}")
    cfg = compose_config(
        "train", ["data=modelnet40", "model.voxel_size=16", "data.on_bad_file=skip"], tmp_path
    )
    dm = instantiate(cfg.data)
    assert dm.on_bad_file == "skip" and dm.source.name == "modelnet40"
    report = dm.validate()
    assert report.dataset == "modelnet40" and report.counts["chair meshes"] == 3
    assert report.splits == {"train": 2, "val": 0, "test": 1}  # < 3 per class: no val
    assert [Path(p.path).name for p in dm.skipped] == ["chair_0003.off:4"]
    dm.setup()
    assert dm.sample_prompts == ["a chair"]


@pytest.mark.parametrize("inner", ["", "03001627"])
def test_shapenet_chairs_config_reads_the_fetched_folder(inner: str, tmp_path: Path) -> None:
    root = tmp_path / "data" / "shapenet_chairs" / inner
    for i, model in enumerate(["1a2b3c", "4d5e6f", "8e8e8e"]):
        write_box(root / model / "models" / "model_normalized.obj", i)
    cfg = compose_config("train", ["data=shapenet_chairs", "model.voxel_size=16"], tmp_path)
    dm = instantiate(cfg.data)
    report = dm.validate()
    assert report.ok and report.dataset == "shapenet_chairs"
    assert report.counts["chair meshes"] == 3
    assert report.splits == {"train": 1, "val": 1, "test": 1}
    assert dm.data is not None and dm.data.captions == ["a chair"] * 3


def test_synthetic_source_and_datamodule_report(tmp_path: Path) -> None:
    src = SyntheticShapes(
        voxel_size=R, num_per_class=5, classes=["sphere", "box"], cache_dir=tmp_path
    )
    report = src.validate()
    assert report.ok and report.counts == {
        "shapes": 10,
        "classes": 2,
        "sphere shapes": 5,
        "box shapes": 5,
    }
    dm = VoxelDataModule(src, voxel_size=R, val_fraction=0.2, test_fraction=0.2)
    assert dm.on_bad_file == "error" and dm.skipped == []
    report = dm.validate()
    assert report.ok and report.splits == {"train": 6, "val": 2, "test": 2}
    with pytest.raises(ValueError, match="on_bad_file must be one of"):
        VoxelDataModule(src, voxel_size=R, on_bad_file="ignore")
    with pytest.raises(ValueError, match="on_bad_file must be one of"):
        MeshFolderVoxels(tmp_path, on_bad_file="warn")

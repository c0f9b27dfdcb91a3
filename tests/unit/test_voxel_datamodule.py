"""Splits, batches, resume state and the mesh-folder source of the voxel datamodule."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.data.mesh_folder import MeshFolderVoxels, caption_for
from genlab.data.splits import stratified_split
from genlab.data.synthetic_shapes import SyntheticShapes
from genlab.data.validation import DataValidationError
from genlab.data.voxel_datamodule import VoxelDataModule


def make_dm(tmp_path: Path, **kw) -> VoxelDataModule:
    src = SyntheticShapes(
        voxel_size=16,
        num_per_class=10,
        classes=["sphere", "box", "torus"],
        seed=0,
        cache_dir=tmp_path,
    )
    return VoxelDataModule(src, voxel_size=16, batch_size=4, **kw)


def test_stratified_split_is_disjoint_complete_and_deterministic() -> None:
    labels = np.repeat([0, 1, 2], 10)
    a = stratified_split(labels, 0.1, 0.2, seed=3)
    b = stratified_split(labels, 0.1, 0.2, seed=3)
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(allidx.tolist()) == list(range(30))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "val", "test")] == [21, 3, 6]
    for k in a:
        assert set(labels[a[k]]) == {0, 1, 2}
    with pytest.raises(ValueError, match="bad split fractions"):
        stratified_split(labels, 0.6, 0.5, seed=0)


def test_batches_have_documented_keys_and_shapes(tmp_path: Path) -> None:
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["voxels"].shape == (4, 1, 16, 16, 16) and batch["voxels"].dtype == torch.float32
    assert set(batch["voxels"].unique().tolist()) <= {0.0, 1.0}
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert dm.sample_prompts == ["a sphere", "a box", "a torus"]
    assert sum(len(v) for v in dm.splits.values()) == 30


def test_max_samples_caps_the_data(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, max_samples=12)
    dm.setup()
    assert sum(len(v) for v in dm.splits.values()) == 12


def test_wrong_resolution_is_reported(tmp_path: Path) -> None:
    src = SyntheticShapes(voxel_size=16, num_per_class=2, classes=["sphere"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="grids are 16\\^3 but voxel_size=32"):
        VoxelDataModule(src, voxel_size=32).setup()


def test_train_order_is_restored_from_state(tmp_path: Path) -> None:
    dm = make_dm(tmp_path)
    dm.setup()
    list(dm.train_dataloader())  # one epoch consumed
    state = {k: v.clone() for k, v in dm.state_dict().items()}
    expected = [b["caption"] for b in dm.train_dataloader()]
    dm2 = make_dm(tmp_path)
    dm2.setup()
    dm2.load_state_dict(state)
    assert [b["caption"] for b in dm2.train_dataloader()] == expected


@pytest.fixture
def modelnet_like(tmp_path: Path, shared_testdata: Path) -> Path:
    """ModelNet layout built from real OFF files written by other people."""
    root = tmp_path / "ModelNetMini"
    src = shared_testdata / "trimesh"
    for cat, files in {
        "ball": ["ballA.off", "ballB.off"],
        "cube": ["whitespace.off", "comments.off"],
    }.items():
        for split, name in zip(("train", "test"), files, strict=True):
            (root / cat / split).mkdir(parents=True)
            shutil.copy(src / name, root / cat / split / f"{cat}_{name}")
        shutil.copy(src / files[0], root / cat / "train" / f"{cat}_extra.off")
    return root


def test_mesh_folder_voxelises_real_off_files_with_their_split(
    modelnet_like: Path, tmp_path: Path
) -> None:
    src = MeshFolderVoxels(modelnet_like, voxel_size=16, cache_dir=tmp_path / "cache")
    dm = VoxelDataModule(src, voxel_size=16, val_fraction=0.0, batch_size=8)
    dm.setup()
    data = dm.data
    assert data.class_names == ["ball", "cube"]
    assert sorted(set(data.captions)) == ["a ball", "a cube"]
    assert len(dm.splits["test"]) == 2 and len(dm.splits["train"]) == 4
    fill = data.voxels.reshape(len(data.voxels), -1).mean(1)
    assert (fill > 0.2).all()  # solid, not only a shell
    assert len(list((tmp_path / "cache").glob("meshes_*.npz"))) == 1
    before = list(modelnet_like.rglob("*"))
    MeshFolderVoxels(modelnet_like, voxel_size=16, cache_dir=tmp_path / "cache").load()
    assert list(modelnet_like.rglob("*")) == before  # never writes into the data folder


def test_malformed_off_stops_with_file_and_line_or_is_skipped(
    modelnet_like: Path, tmp_path: Path
) -> None:
    bad = modelnet_like / "cube" / "train" / "broken.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n1 0\n0 1 0\n3 0 1 2\n")
    with pytest.raises(DataValidationError, match=r"broken\.off:4: expected 3 vertex coordinates"):
        MeshFolderVoxels(modelnet_like, voxel_size=16).load()
    src = MeshFolderVoxels(modelnet_like, voxel_size=16, on_bad_file="skip")
    data = src.load()
    assert len(data.voxels) == 6
    assert [Path(p.path).name for p in src.skipped] == ["broken.off:4"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        MeshFolderVoxels(tmp_path / "nope").load()
    (tmp_path / "empty" / "chair" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no mesh files"):
        MeshFolderVoxels(tmp_path / "empty").load()


def test_caption_articles() -> None:
    assert caption_for("night_stand") == "a night stand"
    assert caption_for("airplane") == "an airplane"

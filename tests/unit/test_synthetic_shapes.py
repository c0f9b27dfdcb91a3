"""The synthetic voxel data set: deterministic, cached, captions that match the shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genlab.data.synthetic_shapes import SyntheticShapes, generate, make_shape
from genlab.data.voxel_dataset import VoxelSet


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = generate(["sphere", "box"], 3, 16, seed=1)
    b = generate(["sphere", "box"], 3, 16, seed=1)
    c = generate(["sphere", "box"], 3, 16, seed=2)
    assert np.array_equal(a.voxels, b.voxels) and a.captions == b.captions
    assert not np.array_equal(a.voxels, c.voxels)
    assert a.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_captions_name_the_class_and_shapes_are_not_empty() -> None:
    data = generate(["sphere", "box", "cylinder", "cone", "torus"], 4, 24, seed=0)
    for grid, caption, label in zip(data.voxels, data.captions, data.labels, strict=True):
        assert data.class_names[label] in caption.split()
        assert grid.sum() >= 8, caption


def test_sphere_fill_matches_analytic_volume() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        grid, caption = make_shape("sphere", 48, rng)
        r_vox = (3 * grid.sum() / (4 * np.pi)) ** (1 / 3)  # radius implied by the voxel count
        occupied = np.argwhere(grid)
        extent = occupied.max(0) - occupied.min(0) + 1
        assert abs(extent.mean() / 2 - r_vox) < 1.0, caption  # round, not elongated


def test_torus_has_a_hole_box_does_not() -> None:
    rng = np.random.default_rng(3)
    torus, _ = make_shape("torus", 32, rng)
    occupied = np.argwhere(torus)
    cx, cy, cz = np.round(occupied.mean(0)).astype(int)
    assert not torus[cx, cy, cz]
    box, _ = make_shape("box", 32, rng)
    occupied = np.argwhere(box)
    assert box[tuple(np.round(occupied.mean(0)).astype(int))]


def test_cached_on_disk_and_reloaded_identically(tmp_path: Path) -> None:
    src = SyntheticShapes(
        voxel_size=16, num_per_class=2, classes=["cone", "torus"], seed=5, cache_dir=tmp_path
    )
    assert src.cache_path is not None and not src.cache_path.exists()
    first = src.load()
    assert src.cache_path.exists()
    again = VoxelSet.load(src.cache_path)
    assert np.array_equal(first.voxels, again.voxels)
    assert first.captions == again.captions and first.class_names == ["cone", "torus"]
    other = SyntheticShapes(
        voxel_size=16, num_per_class=2, classes=["cone", "torus"], seed=6, cache_dir=tmp_path
    )
    assert other.cache_path != src.cache_path


def test_unknown_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown shape classes \\['pyramid'\\]"):
        SyntheticShapes(classes=["sphere", "pyramid"])


def test_voxel_set_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="shape \\(N, R, R, R\\)"):
        VoxelSet(np.zeros((2, 4, 4), bool), ["a", "b"], np.zeros(2, int), ["x"])
    with pytest.raises(ValueError, match="2 grids but 1 captions"):
        VoxelSet(np.zeros((2, 4, 4, 4), bool), ["a"], np.zeros(2, int), ["x"])

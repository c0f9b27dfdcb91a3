"""Voxel IoU: per-sample and pairwise."""

from __future__ import annotations

import pytest
import torch

from genlab.metrics.voxel import pairwise_voxel_iou, voxel_iou


def _cube(lo: int, hi: int, size: int = 8) -> torch.Tensor:
    grid = torch.zeros(size, size, size, dtype=torch.bool)
    grid[lo:hi, lo:hi, lo:hi] = True
    return grid


def test_known_overlaps() -> None:
    a = torch.stack([_cube(0, 4), _cube(0, 4), _cube(0, 2), torch.zeros(8, 8, 8, dtype=torch.bool)])
    b = torch.stack([_cube(0, 4), _cube(2, 6), _cube(4, 6), torch.zeros(8, 8, 8, dtype=torch.bool)])
    iou = voxel_iou(a, b)
    assert iou.shape == (4,) and iou.dtype == torch.float32
    # 64 vs 64 voxels sharing a 2^3 corner: 8 / (128 - 8); disjoint: 0; both empty: 1
    torch.testing.assert_close(iou, torch.tensor([1.0, 8 / 120, 0.0, 1.0]))


def test_probabilities_are_thresholded_and_channel_axis_accepted() -> None:
    target = _cube(0, 4)[None, None].float()  # (1, 1, 8, 8, 8)
    pred = target * 0.7 + 0.2  # inside 0.9, outside 0.2
    assert voxel_iou(pred, target).item() == 1.0
    assert voxel_iou(pred, target, threshold=0.95).item() == 0.0
    only_pred = torch.zeros_like(target)
    assert voxel_iou(pred, only_pred).item() == 0.0


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8\) vs \(2, 1, 8, 8, 8\)"):
        voxel_iou(torch.zeros(2, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"batched grids.*\(8, 8, 8\)"):
        voxel_iou(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8))


def test_pairwise_matches_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, 1, 12, 12, 12, generator=gen)
    b = torch.rand(3, 1, 12, 12, 12, generator=gen)
    b[2] = 0.0  # empty
    matrix = pairwise_voxel_iou(a, b)
    assert matrix.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            expected = voxel_iou(a[i : i + 1], b[j : j + 1])[0]
            torch.testing.assert_close(matrix[i, j], expected)
    torch.testing.assert_close(pairwise_voxel_iou(a, a).diagonal(), torch.ones(5))
    empty = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(pairwise_voxel_iou(empty, empty), torch.ones(2, 2))


def test_pairwise_counts_stay_exact_under_autocast() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 32, 32, 32, generator=gen)
    b = torch.rand(2, 1, 32, 32, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 cannot count to ~16k exactly
        matrix = pairwise_voxel_iou(a, b)
    torch.testing.assert_close(matrix.diagonal(), voxel_iou(a, b), rtol=0, atol=1e-6)


def test_pairwise_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8\) vs \(2, 4, 4, 4\)"):
        pairwise_voxel_iou(torch.zeros(2, 8, 8, 8), torch.zeros(2, 4, 4, 4))

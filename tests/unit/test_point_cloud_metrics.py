"""Per-sample Chamfer-L2 and F-score (Tatarchenko et al. 2019) on point clouds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from genlab.geometry.mesh_losses import chamfer_distance
from genlab.metrics.point_cloud import chamfer_l2, fscore
from tests.conftest import shared_path


def test_fscore_hand_computed() -> None:
    target = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # 3 of 4 predictions within 0.01 of a target point, 1 far away
    pred = torch.tensor([[0.005, 0, 0], [1, 0.009, 0], [0, 1, 0.0], [0.5, 0.5, 0.5]])
    result = fscore(pred, target, threshold=0.01)
    assert result["precision"].tolist() == pytest.approx([0.75])
    # target (0,0,1) has no prediction within 0.01 -> recall 3/4
    assert result["recall"].tolist() == pytest.approx([0.75])
    assert result["fscore"].tolist() == pytest.approx([0.75])
    # asymmetric case: one prediction at one target point
    single = fscore(target[:1], target, threshold=0.01)
    assert single["precision"].item() == 1.0 and single["recall"].item() == 0.25
    assert single["fscore"].item() == pytest.approx(2 * 0.25 / 1.25)


def test_fscore_threshold_is_euclidean_not_squared() -> None:
    a = torch.zeros(1, 1, 3)
    b = torch.tensor([[[0.02, 0.0, 0.0]]])
    assert fscore(a, b, threshold=0.019)["fscore"].item() == 0.0
    assert fscore(a, b, threshold=0.021)["fscore"].item() == 1.0


def test_fscore_zero_when_nothing_matches_and_errors() -> None:
    far = fscore(torch.zeros(2, 5, 3), torch.ones(2, 7, 3))
    assert far["fscore"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="threshold must be positive"):
        fscore(torch.zeros(1, 3), torch.zeros(1, 3), threshold=0.0)
    with pytest.raises(ValueError, match=r"target is an empty point cloud"):
        fscore(torch.zeros(4, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"pred must have shape \(B, N, 3\)"):
        chamfer_l2(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch sizes differ: 2 vs 3"):
        chamfer_l2(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))


def test_chamfer_l2_per_sample_matches_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 200, 3, generator=gen) - 0.5
    target = torch.rand(3, 150, 3, generator=gen) - 0.5
    per_sample = chamfer_l2(pred, target, chunk_size=33)
    assert per_sample.shape == (3,)
    expected = chamfer_distance(pred, target, batch_reduction=None, backend="genlab")
    torch.testing.assert_close(per_sample, expected)
    dense = torch.cdist(pred, target) ** 2
    manual = dense.min(2).values.mean(1) + dense.min(1).values.mean(1)
    torch.testing.assert_close(per_sample, manual, rtol=1e-5, atol=1e-7)


def test_bunny_translated_copy(shared_testdata: Path) -> None:
    cloud = trimesh.load(shared_path(shared_testdata, "point_cloud_utils", "bunny.ply"))
    points = np.asarray(cloud.vertices, dtype=np.float64)
    points = (points - points.mean(0)) * (0.9 / np.ptp(points, axis=0).max())  # unit cube
    target = torch.as_tensor(points[::3])
    shift = torch.tensor([0.004, 0.0, 0.0], dtype=torch.float64)
    pred = target + shift
    cd = chamfer_l2(pred, target).item()
    assert 0 < cd <= 2 * 0.004**2 + 1e-12  # every NN distance is at most |shift|
    # every point is within |shift| of its own translate: perfect score above that distance
    assert fscore(pred, target, threshold=0.0041)["fscore"].item() == 1.0
    # the scan's point spacing is larger than 0.001: no translated point lands that close
    assert fscore(pred, target, threshold=0.001)["fscore"].item() < 0.05
    assert fscore(target, target, threshold=1e-9)["fscore"].item() == 1.0

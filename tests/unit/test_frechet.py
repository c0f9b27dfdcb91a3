"""Fréchet distance: exact against scipy, zero on identical sets, growth with a shift, min_samples,
DDP-style merging, input conversion and the offline Inception errors."""

from __future__ import annotations

import logging
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics.image.fid as tm_fid
from scipy import linalg
from torch import nn

from genlab.metrics.frechet import INCEPTION_URL, FrechetDistance
from genlab.metrics.image_similarity import DinoImageEncoder
from genlab.pretrained import WeightsUnavailableError


class PoolFeatures(nn.Module):
    """A 12-dim image encoder: the mean colour of each image quadrant."""

    feature_dim = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), 2).flatten(1)


def scipy_fd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets."""
    a, b = real.double().numpy(), fake.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def fd(metric: FrechetDistance, real: torch.Tensor, fake: torch.Tensor) -> float:
    metric.reset()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def images(n: int, seed: int, size: int = 8, high: float = 1.0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * high


def test_pooled_features_zero_on_itself_exact_shift_and_scipy() -> None:
    metric = FrechetDistance(PoolFeatures(), min_samples=2)
    a = images(200, 0, high=0.8)
    assert fd(metric, a, a) == pytest.approx(0.0, abs=1e-6)
    # a pure shift of every pixel by d moves each of the 12 features by d, covariance unchanged:
    # FD = 12 d^2, quadratic in the shift
    assert fd(metric, a, a + 0.1) == pytest.approx(12 * 0.1**2, rel=1e-5)
    assert fd(metric, a, a + 0.2) == pytest.approx(12 * 0.2**2, rel=1e-5)
    b = images(150, 1) ** 2  # another mean and covariance
    expected = scipy_fd(PoolFeatures()(a), PoolFeatures()(b))
    assert expected > 0.05
    assert fd(metric, a, b) == pytest.approx(expected, rel=1e-5)
    # uint8 input is the same pictures as float / 255
    a8, b8 = (a * 255).round().to(torch.uint8), (b * 255).round().to(torch.uint8)
    assert fd(metric, a8, b8) == pytest.approx(fd(metric, a8.float() / 255, b8.float() / 255))


def test_tiny_dino_features_match_scipy_and_grow_with_a_shift() -> None:
    dino = DinoImageEncoder(pretrained=None, tiny=True)
    metric = FrechetDistance(dino, min_samples=2)
    assert metric.feature_name == "tiny"
    a = images(72, 2, size=16, high=0.6)  # more images than the 64 feature dimensions
    shifted = {d: fd(metric, a, a + d) for d in (0.0, 0.1, 0.4)}
    assert shifted[0.0] == pytest.approx(0.0, abs=1e-5)
    assert 1e-4 < shifted[0.1] < shifted[0.4]
    b = a + 0.4
    assert shifted[0.4] == pytest.approx(scipy_fd(dino(a), dino(b)), rel=1e-4)


def test_min_samples_gives_none_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    metric = FrechetDistance(PoolFeatures(), min_samples=5)
    a, b = images(4, 0), images(6, 1)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with caplog.at_level(logging.WARNING, logger="genlab.metrics.frechet"):
        assert metric.compute() is None
        assert metric.compute() is None
    said = [r.getMessage() for r in caplog.records if "min_samples=5" in r.getMessage()]
    assert len(said) == 1 and "4 real and 6 fake" in said[0]
    metric.update(images(1, 3), real=True)  # now 5 real, 6 fake
    expected = scipy_fd(PoolFeatures()(torch.cat([a, images(1, 3)])), PoolFeatures()(b))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)
    metric.reset()
    assert (metric.num_real, metric.num_fake) == (0, 0)
    with pytest.raises(ValueError, match="min_samples must be an int >= 2"):
        FrechetDistance(PoolFeatures(), min_samples=1)


def test_statistics_of_two_processes_sum_to_those_of_one() -> None:
    # what DDP sync does: the feature sums, products and counts of each process are added
    a, b = images(60, 0), images(40, 1) ** 2
    whole = FrechetDistance(PoolFeatures())
    part_1, part_2 = FrechetDistance(PoolFeatures()), FrechetDistance(PoolFeatures())
    whole.update(a, real=True)
    whole.update(b, real=False)
    part_1.update(a[:25], real=True)
    part_1.update(b[:10], real=False)
    part_2.update(a[25:], real=True)
    part_2.update(b[10:], real=False)
    part_1.merge_state(part_2)
    assert (part_1.num_real, part_1.num_fake) == (60, 40)
    assert float(part_1.compute()) == pytest.approx(float(whole.compute()), rel=1e-9)


def test_inception_gets_uint8_and_offline_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    seen: list[torch.dtype] = []

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **_):
            super().__init__()
            if feature_extractor_weights_path is None:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.dtype)
            return F.adaptive_avg_pool2d(x.float(), 2).flatten(1).repeat(1, 6)[:, :64]

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    with pytest.raises(WeightsUnavailableError) as offline:
        FrechetDistance("inception")
    msg = str(offline.value)
    assert INCEPTION_URL in msg and "name resolution" in msg and "\n" not in msg
    assert "model.fid.inception_weights=" in msg and "tiny: true" in msg
    with pytest.raises(WeightsUnavailableError, match="no such file: .*missing.pth"):
        FrechetDistance("inception", inception_weights=str(tmp_path / "missing.pth"))

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    metric = FrechetDistance("inception", inception_dim=64, inception_weights=str(weights))
    assert metric.feature_name == "inception_v3/64"
    a = images(30, 0)
    a8 = (a * 255).round().to(torch.uint8)
    assert fd(metric, a, a**2) == pytest.approx(fd(metric, a8, (a**2 * 255).round().byte()))
    assert set(seen) == {torch.uint8}

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError) as missing:
        FrechetDistance("inception")
    assert "pip install torch-fidelity" in str(missing.value) and "\n" not in str(missing.value)

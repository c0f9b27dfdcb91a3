"""Intersection-over-union for batches of occupancy grids."""

from __future__ import annotations

import torch

__all__ = ["pairwise_voxel_iou", "voxel_iou"]


def voxel_iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample IoU of batched grids ``(B, [1,] R, R, R)``, returned as a float ``(B,)`` tensor.

    Probabilities are thresholded (``> threshold``), bools are used as they are. Two empty
    grids have IoU 1.0.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    a, b = _flat_occupancy(pred, threshold), _flat_occupancy(target, threshold)
    intersection = (a & b).sum(dim=1)
    union = (a | b).sum(dim=1)
    return _ratio(intersection, union)


def pairwise_voxel_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU matrix ``(Na, Nb)`` between every grid of ``a`` and every grid of ``b``.

    Grids must have the same per-sample shape. Computed with one matrix product of the
    flattened occupancies; two empty grids have IoU 1.0.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"grid shapes differ: {tuple(a.shape)} vs {tuple(b.shape)} (after the batch axis)"
        )
    fa = _flat_occupancy(a, threshold).float()
    fb = _flat_occupancy(b, threshold).float()
    # float32 counts are exact up to 2^24 voxels per grid (256^3)
    dtype = torch.float64 if fa.shape[1] > 2**24 else torch.float32
    fa, fb = fa.to(dtype), fb.to(dtype)
    with torch.autocast(device_type=fa.device.type, enabled=False):  # keep counts exact
        intersection = fa @ fb.T
    union = fa.sum(dim=1, keepdim=True) + fb.sum(dim=1)[None, :] - intersection
    return _ratio(intersection, union)


def _flat_occupancy(grids: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, ...) bool or probability grids -> (B, N) bool."""
    if grids.ndim < 4:
        raise ValueError(
            f"expected batched grids (B, [1,] R, R, R), got shape {tuple(grids.shape)}"
        )
    occupied = grids if grids.dtype == torch.bool else grids > threshold
    return occupied.reshape(grids.shape[0], -1)


def _ratio(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """intersection / union as float, with 1.0 where the union is empty."""
    intersection, union = intersection.float(), union.float()
    ones = torch.ones_like(union)
    return torch.where(union > 0, intersection / union.clamp_min(1), ones)

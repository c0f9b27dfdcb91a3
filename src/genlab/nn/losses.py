"""Losses shared by the voxel methods."""

from __future__ import annotations

import torch


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``1 - (2|p*t| + s) / (|p| + |t| + s)``; counters the empty-voxel majority."""
    p, t = probs.flatten(1), target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()

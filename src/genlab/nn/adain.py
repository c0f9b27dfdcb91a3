"""Adaptive instance normalisation (AdaIN) for 3D feature volumes, and style-vector mixing.

AdaIN (Huang & Belongie 2017, as used by StyleGAN) normalises each channel of each sample
over its spatial extent, then applies a per-channel scale and bias predicted from a style
vector: ``y = (1 + gamma(s)) * (x - mean) / std + beta(s)``. The ``1 +`` keeps a fresh
layer close to plain instance normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AdaIN3d", "mix_styles"]


class AdaIN3d(nn.Module):
    """Instance norm over ``(D, H, W)`` followed by a style-predicted per-channel affine map.

    ``forward(x (B, C, D, H, W), style (B, style_dim)) -> (B, C, D, H, W)``. The output of
    every channel has mean ``beta`` and standard deviation ``|1 + gamma|`` (up to ``eps``).
    """

    def __init__(self, channels: int, style_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.style_dim = style_dim
        self.norm = nn.InstanceNorm3d(channels, affine=False, eps=eps)
        self.affine = nn.Linear(style_dim, 2 * channels)

    def style_params(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, bias)``, each ``(B, C, 1, 1, 1)``; scale = 1 + gamma."""
        if style.ndim != 2 or style.shape[1] != self.style_dim:
            raise ValueError(
                f"style must have shape (B, {self.style_dim}), got {tuple(style.shape)}"
            )
        gamma, beta = self.affine(style).chunk(2, dim=1)
        shape = (*gamma.shape, 1, 1, 1)
        return (1 + gamma).view(shape), beta.view(shape)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(
                f"features must have shape (B, {self.channels}, D, H, W), got {tuple(x.shape)}"
            )
        if style.shape[0] != x.shape[0]:
            raise ValueError(
                f"style batch {style.shape[0]} does not match feature batch {x.shape[0]}"
            )
        scale, bias = self.style_params(style)
        return self.norm(x) * scale.to(x.dtype) + bias.to(x.dtype)


def mix_styles(a: torch.Tensor, b: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Linear mix of two style vectors: ``weight=0`` gives ``a`` exactly, ``weight=1`` gives ``b``.

    ``weight`` is a number or a tensor broadcastable to ``a`` (e.g. ``(B, 1)`` per sample).
    """
    if a.shape != b.shape:
        raise ValueError(f"styles to mix differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    w = torch.as_tensor(weight, dtype=a.dtype, device=a.device)
    if torch.any((w < 0) | (w > 1)):
        raise ValueError(f"style mixing weight must lie in [0, 1], got {weight}")
    # torch.lerp(a, b, 1) is a + (b - a), which may differ from b in the last bit
    return torch.where(w == 1, b, torch.lerp(a, b, w))

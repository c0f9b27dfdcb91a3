"""PointNet++-style point-cloud encoder (single-scale set abstraction), loadable and freezable.

Two set-abstraction levels (farthest point sampling -> k nearest neighbours -> shared MLP on
relative coordinates and features -> max over the neighbourhood), then a global shared MLP
and max pool to one vector per cloud. Every step is a symmetric function of the input set,
and farthest point sampling starts from the point farthest from the centroid (not from
index 0), so the output does not depend on the order of the points.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PointNet2Encoder", "farthest_point_sample", "knn_group"]


def farthest_point_sample(points: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Indices ``(B, M)`` of ``M`` points spread over each cloud ``(B, N, 3)``.

    Greedy farthest point sampling seeded with the point farthest from the cloud's centroid.
    """
    b, n, _ = points.shape
    if num_samples > n:
        raise ValueError(f"cannot pick {num_samples} centres from a cloud of {n} points")
    with torch.no_grad():
        idx = torch.empty(b, num_samples, dtype=torch.long, device=points.device)
        centroid = points.mean(1, keepdim=True)
        current = (points - centroid).pow(2).sum(-1).argmax(1)
        nearest = torch.full((b, n), float("inf"), device=points.device, dtype=points.dtype)
        rows = torch.arange(b, device=points.device)
        for i in range(num_samples):
            idx[:, i] = current
            d = (points - points[rows, current][:, None]).pow(2).sum(-1)
            nearest = torch.minimum(nearest, d)
            current = nearest.argmax(1)
    return idx


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, N, C)`` at ``idx (B, ...)`` -> ``(B, ..., C)``."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat[..., None].expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


def knn_group(points: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, M, k)`` of the ``k`` points of ``points (B, N, 3)`` nearest each centre ``(B, M, 3)``."""
    k = min(k, points.shape[1])
    with torch.no_grad():
        dist = torch.cdist(centres.float(), points.float())
        return dist.topk(k, dim=-1, largest=False).indices


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """One PointNet++ level: ``M`` centres, ``k``-NN groups, shared MLP, max over each group."""

    def __init__(self, num_centres: int, k: int, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.num_centres, self.k = num_centres, k
        self.mlp = _mlp([in_channels + 3, *widths])
        self.out_channels = widths[-1]

    def forward(
        self, xyz: torch.Tensor, feats: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = min(self.num_centres, xyz.shape[1])
        centres = _gather(xyz, farthest_point_sample(xyz, m))
        groups = knn_group(xyz, centres, self.k)
        local = _gather(xyz, groups) - centres[:, :, None]
        if feats is not None:
            local = torch.cat([local, _gather(feats, groups)], dim=-1)
        return centres, self.mlp(local).amax(dim=2)


class PointNet2Encoder(nn.Module):
    """Point cloud ``(B, N, 3)`` -> one ``out_dim`` vector per cloud.

    ``checkpoint``: a ``.safetensors`` or Lightning ``.ckpt`` holding this encoder's weights
    under ``checkpoint_prefix`` (e.g. ``point_encoder.`` in an otuken3d checkpoint, ``""`` for
    a file of the encoder alone); ``frozen=True`` stops its training (no gradients, always in
    eval mode).
    """

    def __init__(
        self,
        out_dim: int = 512,
        num_centres: Sequence[int] = (512, 128),
        k: Sequence[int] = (32, 32),
        widths: Sequence[Sequence[int]] = ((64, 64, 128), (128, 128, 256)),
        global_widths: Sequence[int] = (256, 512),
        checkpoint: str | None = None,
        checkpoint_prefix: str = "",
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if not (len(num_centres) == len(k) == len(widths)):
            raise ValueError(
                f"num_centres, k and widths need one entry per level, got "
                f"{len(num_centres)}, {len(k)}, {len(widths)}"
            )
        self.out_dim = out_dim
        levels, channels = [], 0
        for m, kk, w in zip(num_centres, k, widths, strict=True):
            levels.append(SetAbstraction(int(m), int(kk), channels, list(w)))
            channels = levels[-1].out_channels
        self.levels = nn.ModuleList(levels)
        self.global_mlp = _mlp([channels + 3, *global_widths])
        self.head = nn.Linear(global_widths[-1], out_dim)
        self.frozen = False
        if checkpoint:
            self.load_checkpoint(checkpoint, checkpoint_prefix)
        if frozen:
            self.freeze()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, prefix: str = "", frozen: bool = False, **kwargs: Any
    ) -> PointNet2Encoder:
        """Build with ``kwargs`` and load the weights stored under ``prefix`` in ``path``."""
        return cls(checkpoint=str(path), checkpoint_prefix=prefix, frozen=frozen, **kwargs)

    def load_checkpoint(self, path: str | Path, prefix: str = "") -> None:
        """Load this encoder's weights from ``path`` (keys ``prefix + name``); strict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"point encoder checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not mine:
            raise ValueError(
                f"{path}: no weights under the prefix '{prefix}' (keys start with: "
                f"{sorted({k.split('.')[0] for k in state})[:8]})"
            )
        self.load_state_dict(mine)

    def freeze(self) -> PointNet2Encoder:
        """No gradients and always eval mode from now on."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> PointNet2Encoder:  # noqa: D102 - frozen: always eval
        return super().train(mode and not self.frozen)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
            raise ValueError(f"points must have shape (B, N>0, 3), got {tuple(points.shape)}")
        xyz, feats = points, None
        for level in self.levels:
            xyz, feats = level(xyz, feats)
        pooled = self.global_mlp(torch.cat([xyz, feats], dim=-1)).amax(dim=1)
        return self.head(pooled)

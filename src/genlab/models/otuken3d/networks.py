"""Networks of otuken3d: latent fusion, style encoder, progressive styled voxel decoder, template mesh head.

Grid convention (genlab's, see ``geometry/voxelize.py``): a feature volume ``(B, C, D, H, W)``
covers the unit cube ``[-0.5, 0.5]^3`` with axis ``D`` along x, ``H`` along y and ``W`` along z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genlab.nn.adain import AdaIN3d

__all__ = [
    "DecoderOutput",
    "LatentFusion",
    "ProgressiveVoxelDecoder",
    "StyleEncoder",
    "TemplateMeshHead",
    "sample_volume",
]


def _mlp(widths: Sequence[int], act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class LatentFusion(nn.Module):
    """Text vector and point-cloud vector -> one ``latent_dim`` latent; either may be absent.

    ``forward(text (B, Dt), points (B, Dp), has_text (B,) bool, has_points (B,) bool)``: an
    absent modality is replaced by a learned "missing" embedding, so the same network serves
    text-only, points-only and joint conditioning (trained with modality dropout).
    """

    def __init__(self, text_dim: int, point_dim: int, latent_dim: int = 512) -> None:
        super().__init__()
        self.text_dim, self.point_dim, self.latent_dim = text_dim, point_dim, latent_dim
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, latent_dim))
        self.point_proj = nn.Sequential(nn.LayerNorm(point_dim), nn.Linear(point_dim, latent_dim))
        self.missing_text = nn.Parameter(torch.zeros(latent_dim))
        self.missing_points = nn.Parameter(torch.zeros(latent_dim))
        self.mix = _mlp([2 * latent_dim, latent_dim, latent_dim])

    def forward(
        self,
        text: torch.Tensor,
        points: torch.Tensor,
        has_text: torch.Tensor,
        has_points: torch.Tensor,
    ) -> torch.Tensor:
        t = torch.where(has_text[:, None], self.text_proj(text), self.missing_text.to(text.dtype))
        p = torch.where(
            has_points[:, None], self.point_proj(points), self.missing_points.to(points.dtype)
        )
        return self.mix(torch.cat([t, p], dim=1))


@dataclass
class StyleCodes:
    """Style vectors for the coarse (global) and fine (local) decoder blocks, each ``(B, style_dim)``."""

    global_: torch.Tensor
    local: torch.Tensor


class StyleEncoder(nn.Module):
    """Pooled text embedding of the style description -> global and local style vectors.

    Samples without a style description (``has_style`` False) use a learned "no style" input.
    """

    def __init__(self, text_dim: int, style_dim: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        self.style_dim = style_dim
        self.no_style = nn.Parameter(torch.zeros(text_dim))
        self.trunk = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden_dim), nn.SiLU()
        )
        self.to_global = _mlp([hidden_dim, hidden_dim, style_dim])
        self.to_local = _mlp([hidden_dim, hidden_dim, style_dim])

    def forward(self, style_text: torch.Tensor, has_style: torch.Tensor) -> StyleCodes:
        x = torch.where(has_style[:, None], style_text, self.no_style.to(style_text.dtype))
        h = self.trunk(x)
        return StyleCodes(self.to_global(h), self.to_local(h))


class StyledBlock(nn.Module):
    """Trilinear resize to ``out_size`` -> Conv3d 3x3x3 -> AdaIN(style) -> LeakyReLU.

    ``residual=True`` (same in and out channels) returns ``x + gain * block(x)`` with ``gain``
    a learned scalar starting at 0 (ReZero): a new block starts as a plain resize. ``gain`` has
    shape (1,), not (), since FSDP cannot shard 0-dim parameters; 0-dim gains of older
    checkpoints load into it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        style_dim: int,
        out_size: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError("a residual block needs as many input as output channels")
        self.out_size = out_size
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.adain = AdaIN3d(out_channels, style_dim)
        self.gain = nn.Parameter(torch.zeros(1)) if residual else None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        gain = state_dict.get(prefix + "gain")
        if gain is not None and gain.ndim == 0:  # .ndim: Lightning's lazily loaded tensors have it
            state_dict[prefix + "gain"] = gain.contiguous().reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=(self.out_size,) * 3, mode="trilinear", align_corners=False)
        y = F.leaky_relu(self.adain(self.conv(x), style), 0.2)
        return y if self.gain is None else x + self.gain * y


@dataclass
class DecoderOutput:
    """Occupancy logits ``(B, 1, S, S, S)`` at the asked size and the multi-scale trunk features."""

    logits: torch.Tensor
    trunk_features: list[torch.Tensor]


class ProgressiveVoxelDecoder(nn.Module):
    """Latent + styles -> occupancy logits at any of ``voxel_sizes``, grown coarse to fine.

    A linear map makes a ``channels[0]`` x 4^3 volume; trunk blocks double it up to
    ``voxel_sizes[0]`` (channels from ``channels``), then one residual stage block per further
    size resizes trilinearly (e.g. 32 -> 48 -> 64). Every size has its own 1x1x1 output head,
    and all blocks and heads exist from the start (growing never adds parameters); see
    :meth:`inherit_head` for a smooth switch. The first
    ``num_global_blocks`` blocks (the coarse ones: overall shape) take the global style, the
    rest (fine detail) the local style. ``alpha < 1`` fades a newly switched-on size in: the
    output is ``alpha * head_S + (1 - alpha) * resize(head_prev)`` as in progressive GANs.
    """

    def __init__(
        self,
        latent_dim: int,
        style_dim: int,
        voxel_sizes: Sequence[int] = (32, 48, 64),
        channels: Sequence[int] = (256, 128, 64, 32),
        num_global_blocks: int | None = None,
        base_size: int = 4,
        occupancy_prior: float = 0.1,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in voxel_sizes]
        if sorted(set(sizes)) != sizes:
            raise ValueError(f"voxel_sizes must be strictly increasing, got {list(voxel_sizes)}")
        doublings = math.log2(sizes[0] / base_size)
        if doublings < 0 or doublings != int(doublings):
            raise ValueError(
                f"voxel_sizes[0]={sizes[0]} must be base_size={base_size} times a power of 2"
            )
        if len(channels) != int(doublings) + 1:
            raise ValueError(
                f"channels needs {int(doublings) + 1} entries (the {base_size}^3 base and one per "
                f"doubling up to {sizes[0]}^3), got {list(channels)}"
            )
        self.voxel_sizes, self.base_size = sizes, base_size
        self.latent_dim, self.style_dim = latent_dim, style_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.channels = [int(c) for c in channels]
        self.fc = nn.Linear(latent_dim, self.channels[0] * base_size**3)
        self.base_adain = AdaIN3d(self.channels[0], style_dim)
        trunk_sizes = [base_size * 2 ** (i + 1) for i in range(int(doublings))]
        self.trunk = nn.ModuleList(
            StyledBlock(a, b, style_dim, s)
            for a, b, s in zip(self.channels[:-1], self.channels[1:], trunk_sizes, strict=True)
        )
        c = self.channels[-1]
        self.stages = nn.ModuleList(
            StyledBlock(c, c, style_dim, s, residual=True) for s in sizes[1:]
        )
        self.heads = nn.ModuleList(nn.Conv3d(c, 1, 1) for _ in sizes)
        prior = math.log(occupancy_prior / (1 - occupancy_prior))
        for head in self.heads:  # start near the expected filled fraction
            nn.init.constant_(head.bias, prior)
        num_blocks = 1 + len(self.trunk) + len(self.stages)
        self.num_global_blocks = (
            len(self.trunk) if num_global_blocks is None else int(num_global_blocks)
        )
        if not 0 <= self.num_global_blocks <= num_blocks:
            raise ValueError(
                f"num_global_blocks must be in [0, {num_blocks}], got {num_global_blocks}"
            )

    @torch.no_grad()
    def inherit_head(self, size: int, previous: int) -> None:
        """Copy the ``previous`` size's output head into ``size``'s (in place: the parameters,
        and so the optimizer, stay the same objects). With the residual stage blocks starting
        at gain 0, the new size then starts from the resized output of the previous one."""
        src, dst = self.voxel_sizes.index(previous), self.voxel_sizes.index(size)
        self.heads[dst].load_state_dict(self.heads[src].state_dict())

    def _run(self, block: nn.Module, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, style, use_reentrant=False)
        return block(x, style)

    def forward(
        self,
        latent: torch.Tensor,
        style_global: torch.Tensor,
        style_local: torch.Tensor,
        size: int | None = None,
        alpha: float = 1.0,
    ) -> DecoderOutput:
        size = self.voxel_sizes[-1] if size is None else int(size)
        if size not in self.voxel_sizes:
            raise ValueError(f"size {size} is not one of voxel_sizes {self.voxel_sizes}")
        level = self.voxel_sizes.index(size)
        styles = iter(
            [style_global] * self.num_global_blocks
            + [style_local] * (1 + len(self.trunk) + len(self.stages))
        )
        b, s = latent.shape[0], self.base_size
        x = self.fc(latent).view(b, self.channels[0], s, s, s)
        x = F.leaky_relu(self.base_adain(x, next(styles)), 0.2)
        trunk_features = [x]
        for block in self.trunk:
            x = self._run(block, x, next(styles))
            trunk_features.append(x)
        feats = [x]
        for block in self.stages[:level]:
            feats.append(self._run(block, feats[-1], next(styles)))
        logits = self.heads[level](feats[level])
        if level > 0 and alpha < 1.0:
            previous = F.interpolate(
                self.heads[level - 1](feats[level - 1]),
                size=(size,) * 3,
                mode="trilinear",
                align_corners=False,
            )
            logits = alpha * logits + (1.0 - alpha) * previous
        return DecoderOutput(logits, trunk_features)


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear features ``(B, P, C)`` of ``volume (B, C, D, H, W)`` at world points ``(B, P, 3)``.

    The volume covers ``[-0.5, 0.5]^3`` with voxel edges at the cube's faces, hence
    ``align_corners=False`` and normalised coordinates ``2 * xyz``; ``grid_sample`` reads its
    last coordinate as the D axis, so (x, y, z) is passed as (z, y, x). Computed in float32.
    """
    grid = (2.0 * points.float()).flip(-1)[:, :, None, None, :]
    # float32 coordinates and features (under bf16 autocast a bf16 grid is off by ~1/256)
    with torch.autocast(device_type=volume.device.type, enabled=False):
        out = F.grid_sample(
            volume.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
    return out[:, :, :, 0, 0].transpose(1, 2)


class TemplateMeshHead(nn.Module):
    """Deforms an icosphere template with per-vertex offsets (a differentiable mesh path).

    Each of ``num_refinements`` steps samples the decoder's multi-scale feature volumes at the
    current vertex positions, concatenates the positions and a projection of the latent, and
    predicts bounded offsets (``max_offset * tanh``), as in Pixel2Mesh / Mesh R-CNN refinement
    heads. ``forward(latent, features) -> (B, V, 3)`` vertices; ``faces`` is the template's.
    """

    def __init__(
        self,
        latent_dim: int,
        feature_channels: Sequence[int],
        hidden_dim: int = 128,
        subdivisions: int = 3,
        radius: float = 0.3,
        num_refinements: int = 2,
        max_offset: float = 0.2,
    ) -> None:
        super().__init__()
        import trimesh

        sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
        self.register_buffer(
            "template_verts", torch.as_tensor(sphere.vertices, dtype=torch.float32), False
        )
        self.register_buffer(
            "faces", torch.as_tensor(sphere.faces, dtype=torch.int64), persistent=False
        )
        self.feature_channels = [int(c) for c in feature_channels]
        self.max_offset = max_offset
        self.latent_proj = nn.Linear(latent_dim, hidden_dim)
        in_dim = 3 + hidden_dim + sum(self.feature_channels)
        self.steps = nn.ModuleList(
            _mlp([in_dim, hidden_dim, hidden_dim, 3]) for _ in range(num_refinements)
        )
        for step in self.steps:  # start from the template itself
            nn.init.zeros_(step[-1].weight)
            nn.init.zeros_(step[-1].bias)

    def forward(self, latent: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if [f.shape[1] for f in features] != self.feature_channels:
            raise ValueError(
                f"feature volumes have channels {[f.shape[1] for f in features]}, "
                f"the mesh head was built for {self.feature_channels}"
            )
        b = latent.shape[0]
        verts = self.template_verts.to(latent.dtype).expand(b, -1, -1)
        code = self.latent_proj(latent)[:, None].expand(-1, verts.shape[1], -1)
        for step in self.steps:
            sampled = [sample_volume(f, verts) for f in features]
            offset = step(torch.cat([verts, code, *sampled], dim=-1))
            verts = verts + self.max_offset * torch.tanh(offset)
        return verts

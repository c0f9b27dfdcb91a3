"""Networks of the text-conditioned voxel VAE-GAN: conditional VAE and conditional discriminator."""

from __future__ import annotations

import math

import torch
from torch import nn

from genlab.nn.voxel import DownStack, UpStack, channel_plan


def _bottleneck(voxel_size: int, num_layers: int, what: str) -> int:
    side = voxel_size // 2**num_layers
    if side < 1 or side * 2**num_layers != voxel_size:
        raise ValueError(f"{what}: voxel_size {voxel_size} is not divisible by 2**{num_layers}")
    return side


class ConditionalVAE(nn.Module):
    """3D-conv encoder q(z | x, c) and decoder p(x | z, c); the decoder outputs occupancy logits."""

    def __init__(
        self,
        voxel_size: int = 32,
        latent_dim: int = 128,
        cond_dim: int = 512,
        hidden_channels: int = 32,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        use_batch_norm: bool = True,
        dropout_rate: float = 0.0,
        occupancy_prior: float = 0.1,
    ) -> None:
        """``occupancy_prior``: expected fraction of filled voxels; the output bias starts at its logit so
        training does not begin by collapsing every grid to empty."""
        super().__init__()
        if not 0 < occupancy_prior < 1:
            raise ValueError(f"occupancy_prior must be in (0, 1), got {occupancy_prior}")
        self.voxel_size, self.latent_dim, self.cond_dim = voxel_size, latent_dim, cond_dim
        enc_side = _bottleneck(voxel_size, num_encoder_layers, "encoder")
        self.dec_side = _bottleneck(voxel_size, num_decoder_layers, "decoder")
        self.encoder = DownStack(
            1, hidden_channels, num_encoder_layers, use_batch_norm, dropout_rate
        )
        enc_features = self.encoder.out_channels * enc_side**3
        self.to_posterior = nn.Linear(enc_features + cond_dim, 2 * latent_dim)
        self.dec_channels = channel_plan(hidden_channels, num_decoder_layers)[-1]
        self.from_latent = nn.Sequential(
            nn.Linear(latent_dim + cond_dim, self.dec_channels * self.dec_side**3),
            nn.ReLU(inplace=True),
        )
        self.decoder = UpStack(
            self.dec_channels, hidden_channels, num_decoder_layers, 1, use_batch_norm, dropout_rate
        )
        nn.init.constant_(self.decoder[-1].bias, math.log(occupancy_prior / (1 - occupancy_prior)))

    def encode(self, voxels: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, latent_dim)."""
        h = self.encoder(voxels).flatten(1)
        mu, logvar = self.to_posterior(torch.cat([h, cond], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, 1, R, R, R)."""
        h = self.from_latent(torch.cat([z, cond], dim=1))
        s = self.dec_side
        return self.decoder(h.view(-1, self.dec_channels, s, s, s))

    def forward(
        self, voxels: torch.Tensor, cond: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct: (logits, mu, logvar); ``sample=False`` decodes the posterior mean."""
        mu, logvar = self.encode(voxels, cond)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return self.decode(z, cond), mu, logvar


class Discriminator(nn.Module):
    """3D-conv discriminator with a projection term for the text condition; returns (B,) logits."""

    def __init__(
        self,
        voxel_size: int = 32,
        cond_dim: int = 512,
        hidden_channels: int = 32,
        num_layers: int = 4,
        use_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        side = _bottleneck(voxel_size, num_layers, "discriminator")
        self.features = DownStack(
            1, hidden_channels, num_layers, use_batch_norm, norm_first_layer=False
        )
        n = self.features.out_channels * side**3
        self.head = nn.Linear(n, 1)
        self.cond_proj = nn.Linear(cond_dim, n, bias=False)

    def forward(self, voxels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.features(voxels).flatten(1)
        return self.head(h).squeeze(1) + (self.cond_proj(cond) * h).sum(1) / h.shape[1] ** 0.5

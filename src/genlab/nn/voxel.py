"""3D convolution stacks shared by voxel encoders, decoders and discriminators."""

from __future__ import annotations

from torch import nn


def _norm(channels: int, use_batch_norm: bool) -> nn.Module:
    return nn.BatchNorm3d(channels) if use_batch_norm else nn.Identity()


def channel_plan(hidden_channels: int, num_layers: int, max_channels: int = 512) -> list[int]:
    """Channels after each stride-2 layer: hidden, 2*hidden, 4*hidden, ... capped at max_channels."""
    return [min(hidden_channels * 2**i, max_channels) for i in range(num_layers)]


class DownStack(nn.Sequential):
    """``num_layers`` x (Conv3d k4 s2 p1 -> [BatchNorm] -> LeakyReLU -> [Dropout]): halves the grid each layer."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_layers: int,
        use_batch_norm: bool = True,
        dropout_rate: float = 0.0,
        norm_first_layer: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        channels = channel_plan(hidden_channels, num_layers)
        prev = in_channels
        for i, ch in enumerate(channels):
            use_bn = use_batch_norm and (norm_first_layer or i > 0)
            layers += [
                nn.Conv3d(prev, ch, 4, stride=2, padding=1, bias=not use_bn),
                _norm(ch, use_bn),
            ]
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            if dropout_rate > 0:
                layers.append(nn.Dropout3d(dropout_rate))
            prev = ch
        super().__init__(*layers)
        self.out_channels = prev


class UpStack(nn.Sequential):
    """``num_layers`` x ConvTranspose3d k4 s2 p1: doubles the grid each layer, ends in ``out_channels`` logits."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_layers: int,
        out_channels: int = 1,
        use_batch_norm: bool = True,
        dropout_rate: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        channels = channel_plan(hidden_channels, num_layers - 1)[::-1] + [out_channels]
        prev = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            layers.append(
                nn.ConvTranspose3d(
                    prev, ch, 4, stride=2, padding=1, bias=last or not use_batch_norm
                )
            )
            if not last:
                layers += [_norm(ch, use_batch_norm), nn.ReLU(inplace=True)]
                if dropout_rate > 0:
                    layers.append(nn.Dropout3d(dropout_rate))
            prev = ch
        super().__init__(*layers)

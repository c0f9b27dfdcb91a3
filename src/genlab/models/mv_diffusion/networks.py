"""The parts of the multi-view diffusion model: UNet, VAE, CLIP image encoder, noise scheduler.

Each builder either loads pretrained weights (``pretrained``: a hub id or a local folder of
an image-variation Stable Diffusion checkpoint, with ``unet/``, ``vae/`` and
``image_encoder/`` subfolders) or builds the part from ``config`` with random weights (the
tiny variant, ``model=mv_diffusion_tiny``; seeded, so the frozen VAE and image encoder come
out identical every time they are rebuilt from the config). Missing weights offline raise one
:class:`~genlab.pretrained.WeightsUnavailableError` line naming ``model.pretrained`` and the
tiny variant.

The UNet takes ``in_channels = 8``: the noisy latent (4) and the VAE latent of the
conditioning image (4), concatenated on the channel axis, and a 10-dim camera/domain
embedding through ``class_embed_type="projection"`` (see :mod:`genlab.data.cameras`). A
pretrained 4-channel ``conv_in`` is widened with zero weights for the extra channels, so the
loaded UNet starts out computing what the image-variation UNet computes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from genlab.pretrained import from_pretrained_or_explain, local_path

log = logging.getLogger(__name__)

__all__ = [
    "OFFLINE_CHOICE",
    "TINY_IMAGE_ENCODER",
    "TINY_UNET",
    "TINY_VAE",
    "build_image_encoder",
    "build_unet",
    "build_vae",
    "real_size_unet_config",
    "widen_conv_in",
]

#: What the one-line error offers instead of downloaded weights.
OFFLINE_CHOICE = "model=mv_diffusion_tiny"
CONFIG_KEY = "model.pretrained"

#: Tiny UNet (about 0.8 M parameters): 8x8 latents of 64-px images, cross-attention on the
#: 32-dim image embedding of :data:`TINY_IMAGE_ENCODER`. Its mid block and its last up block
#: have self-attention, so every attention switch has somewhere to act.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
#: Tiny VAE: 4 blocks (downsampling x8, like Stable Diffusion's), 4 latent channels.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 64,
}
#: Tiny CLIP vision tower with projection (``image_embeds`` of 32 dims), 224-px input.
TINY_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "projection_dim": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
}


def _seeded(seed: int | None, build):
    """Run ``build()`` with the global RNG seeded to ``seed`` (and restored afterwards)."""
    if seed is None:
        return build()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build()


def _subfolder(spec: str | Path, subfolder: str | None) -> str | None:
    """``subfolder``, or None when ``spec`` is a local folder holding the part itself."""
    local = local_path(spec)
    if (
        subfolder
        and local is not None
        and (local / "config.json").is_file()
        and not (local / subfolder).is_dir()
    ):
        return None
    return subfolder


def _check_source(pretrained: Any, config: Any, what: str) -> None:
    if pretrained and config:
        raise ValueError(f"{what}: give either pretrained weights or a config, not both")
    if not pretrained and not config:
        raise ValueError(
            f"{what}: needs pretrained weights ({CONFIG_KEY}=<hub id or local folder>) or a "
            f"config (random weights, as in {OFFLINE_CHOICE})"
        )


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


def widen_conv_in(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``conv_in`` weight ``(C, c, k, k)`` -> ``(C, in_channels, k, k)``: new input channels zero."""
    out_ch, old, *kernel = weight.shape
    if old > in_channels:
        raise ValueError(f"conv_in has {old} input channels, more than in_channels={in_channels}")
    wide = weight.new_zeros(out_ch, in_channels, *kernel)
    wide[:, :old] = weight
    return wide


def build_unet(
    pretrained: str | None = None,
    subfolder: str | None = "unet",
    config: Mapping[str, Any] | None = None,
    in_channels: int = 8,
    camera_embed_dim: int = 10,
    zero_init_camera_projection: bool = True,
    seed: int | None = 0,
):
    """The multi-view UNet: ``UNet2DConditionModel`` with 8 input channels and a camera projection.

    Args:
        pretrained: hub id or local folder (``subfolder`` inside it, or the UNet folder
            itself) of an image-variation UNet; its ``conv_in`` is widened to ``in_channels``
            (extra weights zero) and a ``projection`` class embedding of
            ``camera_embed_dim`` inputs is added when it has none.
        config: ``UNet2DConditionModel`` arguments for a randomly initialised UNet (tiny);
            ``in_channels`` and the class embedding are set here.
        zero_init_camera_projection: zero the *output* layer of the camera projection, so
            the UNet starts out ignoring the camera (a pretrained UNet then computes what it
            computed before). Only the output layer: zeroing both layers of the projection
            would leave both without gradients, and the camera would never be learned.
        seed: seeds the random initialisation of new weights (config UNet, camera projection).
    """
    from diffusers import UNet2DConditionModel

    _check_source(pretrained, config, "build_unet")
    embed = {
        "in_channels": in_channels,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": camera_embed_dim,
    }
    if config:
        unet = _seeded(seed, lambda: UNet2DConditionModel(**{**dict(config), **embed}))
    else:
        base = from_pretrained_or_explain(
            UNet2DConditionModel,
            str(pretrained),
            CONFIG_KEY,
            OFFLINE_CHOICE,
            what="UNet",
            subfolder=_subfolder(str(pretrained), subfolder),
        )
        unet = _adapt_pretrained_unet(base, embed, seed, str(pretrained))
    if zero_init_camera_projection:
        last = unet.class_embedding.linear_2
        torch.nn.init.zeros_(last.weight)
        if last.bias is not None:
            torch.nn.init.zeros_(last.bias)
    return unet


def _adapt_pretrained_unet(base, embed: dict[str, Any], seed: int | None, source: str):
    """A copy of ``base`` with ``embed``'s input channels and camera projection (weights kept)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(base.config)
    if all(cfg.get(k) == v for k, v in embed.items()):
        return base  # already a multi-view UNet
    if cfg.get("class_embed_type") not in (None, "projection"):
        raise ValueError(
            f"{source}: the UNet has class_embed_type={cfg['class_embed_type']!r}; the "
            "multi-view model needs none (it adds a camera projection) or 'projection'"
        )
    old_in = int(cfg["in_channels"])
    unet = _seeded(seed, lambda: UNet2DConditionModel.from_config({**cfg, **embed}))
    state = base.state_dict()
    if old_in != embed["in_channels"]:
        state["conv_in.weight"] = widen_conv_in(state["conv_in.weight"], embed["in_channels"])
        log.info(
            "UNet conv_in widened from %d to %d input channels: channels %d-%d (the "
            "conditioning image latent) start with zero weights",
            old_in,
            embed["in_channels"],
            old_in,
            embed["in_channels"] - 1,
        )
    if (
        cfg.get("class_embed_type") == "projection"
        and cfg.get("projection_class_embeddings_input_dim")
        != embed["projection_class_embeddings_input_dim"]
    ):
        state = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(
            f"{source}: UNet weights do not fit the multi-view UNet (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    if missing:
        log.info(
            "UNet: new camera projection (class embedding, %d -> %d) for the %d-dim camera "
            "embedding",
            embed["projection_class_embeddings_input_dim"],
            unet.class_embedding.linear_2.out_features,
            embed["projection_class_embeddings_input_dim"],
        )
    return unet


def real_size_unet_config(cross_attention_dim: int = 768, sample_size: int = 32) -> dict[str, Any]:
    """``UNet2DConditionModel``'s default (Stable Diffusion 1.x sized) config for image variation."""
    return {"cross_attention_dim": cross_attention_dim, "sample_size": sample_size}


# --------------------------------------------------------------------------------------------
# Frozen parts
# --------------------------------------------------------------------------------------------


def build_vae(
    pretrained: str | None = None,
    subfolder: str | None = "vae",
    config: Mapping[str, Any] | None = None,
    seed: int | None = 0,
):
    """``AutoencoderKL`` from ``pretrained`` (hub id / local folder) or ``config`` (random), frozen."""
    from diffusers import AutoencoderKL

    _check_source(pretrained, config, "build_vae")
    if config:
        vae = _seeded(seed, lambda: AutoencoderKL(**dict(config)))
    else:
        vae = from_pretrained_or_explain(
            AutoencoderKL,
            str(pretrained),
            CONFIG_KEY,
            OFFLINE_CHOICE,
            what="VAE",
            subfolder=_subfolder(str(pretrained), subfolder),
        )
    return vae.requires_grad_(False).eval()


def build_image_encoder(
    pretrained: str | None = None,
    subfolder: str | None = "image_encoder",
    config: Mapping[str, Any] | None = None,
    seed: int | None = 0,
):
    """``CLIPVisionModelWithProjection`` from ``pretrained`` or ``config`` (random), frozen."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _check_source(pretrained, config, "build_image_encoder")
    if config:
        encoder = _seeded(
            seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(config)))
        )
    else:
        kwargs: dict[str, Any] = {}
        sub = _subfolder(str(pretrained), subfolder)
        if sub:
            kwargs["subfolder"] = sub
        encoder = from_pretrained_or_explain(
            CLIPVisionModelWithProjection,
            str(pretrained),
            CONFIG_KEY,
            OFFLINE_CHOICE,
            what="CLIP image encoder",
            **kwargs,
        )
    return encoder.requires_grad_(False).eval()

"""Multi-view diffusion with normals: one image in, N views x {RGB, normal map} out.

The UNet batch
--------------
A batch of ``B`` objects (``genlab.data.mvds``) becomes ``B x 2 x N`` UNet samples, ordered
``(object b, domain d, view n)`` with the view changing fastest::

    index = (b * 2 + d) * N + n        d = 0: RGB, d = 1: normal map

- target latents: the VAE latents (x ``scaling_factor``) of ``image_target_vae`` (d = 0) and
  ``normal_target_vae`` (d = 1);
- UNet input: the noisy target latent concatenated (channels 4-7) with the VAE latent of the
  object's conditioning image ``image_cond_vae`` (the distribution's mode, the same for all
  2N samples of an object);
- class embedding: ``camera_embed_image`` for the RGB half, ``camera_embed_normal`` for the
  normal half (10 numbers: relative camera and the domain switch, see
  :mod:`genlab.data.cameras`);
- cross-attention context: the CLIP ``image_embeds`` of ``image_cond_CLIP`` as one token.

The self-attention layers use :mod:`genlab.nn.multiview_attention`, which relies on exactly
this order.

Training
--------
One timestep per object, shared by its 2N samples (``shared_timesteps``, default; the
sampler denoises all views of an object at the same noise level, and the views attend to
each other at that level), or one per sample. Fresh Gaussian noise per sample. The target
follows the noise scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or
``sample``); optional min-SNR weighting (``snr_gamma``). Classifier-free guidance is learned
by dropping, per object with probability ``cond_dropout``, both the CLIP embedding and the
conditioning latent (``cond_dropout_mode="joint"``, what the unconditional branch at sampling
sees), or each of them independently (``"independent"``). Only the UNet trains; the VAE and
the CLIP encoder are frozen and kept out of checkpoints. Optional EMA of the UNet
(``ema_decay``), saved in checkpoints and used for sampling.

Validation
----------
``val/loss`` (fixed noise and timesteps per batch, so epochs compare), then for the first
``num_val_objects`` held-out objects: DDIM sampling of all views and normal maps from the
conditioning image with classifier-free guidance, PSNR and SSIM against the target views (RGB
and normals separately) and LPIPS when its backbone weights are available; PNGs and a grid
in ``<run>/samples/step_XXXXXX/``, the grid also sent to the loggers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genlab.data.cameras import camera_embeddings, look_at_camera
from genlab.data.mvds import CLIP_MEAN, CLIP_STD
from genlab.distributed import EMA_SEES_A_SHARD, refuse_under_sharding
from genlab.models.base import GenerativeModule
from genlab.nn.multiview_attention import install_multiview_attention
from genlab.pretrained import WeightsUnavailableError
from genlab.samples import Sample

log = logging.getLogger(__name__)

__all__ = [
    "DOMAINS",
    "MultiViewDiffusion",
    "MultiViewImages",
    "camera_layout",
    "interleave_domains",
    "prepare_condition_image",
    "views_grid",
    "write_views",
]

#: Domains in UNet batch order.
DOMAINS: tuple[str, str] = ("rgb", "normal")
LPIPS_MODES = ("auto", "true", "false")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def interleave_domains(rgb: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """``(B, N, ...)`` RGB and normal tensors -> ``(B * 2 * N, ...)`` in (object, domain, view) order."""
    if rgb.shape != normal.shape:
        raise ValueError(f"RGB {tuple(rgb.shape)} and normal {tuple(normal.shape)} shapes differ")
    return torch.stack([rgb, normal], dim=1).flatten(0, 2)


def camera_layout(
    input_elevation: float, elevations: Sequence[float], azimuths: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera embeddings ``(N, 10)`` (image, normal) of N views around the input view.

    The input camera looks at the object from elevation ``input_elevation`` (degrees) and
    azimuth 0; view ``i`` is at elevation ``input_elevation + elevations[i]`` and azimuth
    ``azimuths[i]`` (degrees, relative to the input). Computed by
    :func:`genlab.data.cameras.camera_embeddings`, the same function the data uses.
    """
    if len(elevations) != len(azimuths) or not elevations:
        raise ValueError(
            f"need as many view elevations as azimuths (>= 1), got {len(elevations)} and "
            f"{len(azimuths)}"
        )
    for e in (input_elevation, *(input_elevation + float(d) for d in elevations)):
        if not -90.0 <= e <= 90.0:
            raise ValueError(f"view elevation {e:g} is outside [-90, 90] degrees")
    cond = look_at_camera(float(input_elevation), 0.0, 2.0)
    targets = [
        look_at_camera(float(input_elevation) + float(d), float(a), 2.0)
        for d, a in zip(elevations, azimuths, strict=True)
    ]
    return (
        torch.from_numpy(camera_embeddings(cond, targets, "image")),
        torch.from_numpy(camera_embeddings(cond, targets, "normal")),
    )


def _to_pil(x: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> RGB image."""
    array = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare_condition_image(
    image: Image.Image,
    size: int,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    recenter: bool = False,
    object_scale: float = 0.85,
) -> Image.Image:
    """An RGB ``size`` x ``size`` conditioning image from a photo or render.

    With an alpha channel that marks a background (some alpha < 255) the background is
    removed by it: the image is composited onto ``background`` (RGB in [0, 1]), and with
    ``recenter`` the object (alpha > 0) is cropped, centred and scaled so that its longer side
    spans ``object_scale`` of the image. Otherwise the image is used as it is (shorter side
    to ``size``, centre crop).
    """
    from genlab.data.images import resize_to

    if not 0 < object_scale <= 1:
        raise ValueError(f"object_scale must be in (0, 1], got {object_scale}")
    bg = tuple(int(round(float(c) * 255)) for c in background)
    if len(bg) != 3 or any(not 0 <= c <= 255 for c in bg):
        raise ValueError(f"background must be 3 numbers in [0, 1], got {background}")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    rgba = image.convert("RGBA") if has_alpha else None
    alpha = np.asarray(rgba)[..., 3] if rgba is not None else None
    if alpha is None or alpha.min() == 255:  # no alpha, or an opaque one: a plain photo
        return resize_to(image.convert("RGB"), size)
    if recenter and (alpha > 0).any():
        rows, cols = np.nonzero(alpha > 0)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop = rgba.crop((int(left), int(top), int(right), int(bottom)))
        side = int(math.ceil(max(crop.size) / object_scale))
        canvas = Image.new("RGBA", (side, side), (*bg, 0))
        canvas.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
        rgba = canvas
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (*bg, 255)), rgba).convert("RGB")
    return resize_to(flat, size)


def views_grid(
    rgb: torch.Tensor,
    normal: torch.Tensor,
    inputs: torch.Tensor | None = None,
    target_rgb: torch.Tensor | None = None,
    target_normal: torch.Tensor | None = None,
) -> Image.Image:
    """One picture of generated views: per object an RGB row and a normal row (+ target rows).

    ``rgb``, ``normal`` (and the optional targets) are ``(M, N, 3, S, S)`` in [0, 1]; columns
    are the N views, preceded by the conditioning image (``inputs``, ``(M, 3, S, S)``) when
    given. Each tile is labelled.
    """
    from genlab.geometry.render import image_grid

    m, n = rgb.shape[:2]
    size = rgb.shape[-1]
    blank = Image.new("RGB", (size, size), "white")
    tiles: list[Image.Image] = []
    labels: list[str] = []
    for i in range(m):
        rows = [("rgb", rgb), ("normal", normal)]
        if target_rgb is not None:
            rows.append(("gt rgb", target_rgb))
        if target_normal is not None:
            rows.append(("gt normal", target_normal))
        for r, (name, views) in enumerate(rows):
            if inputs is not None:
                tiles.append(_to_pil(inputs[i]) if r == 0 else blank)
                labels.append(f"#{i} input" if r == 0 else "")
            tiles.extend(_to_pil(views[i, v]) for v in range(n))
            labels.extend(f"{name} {v}" for v in range(n))
    return image_grid(tiles, ncols=n + (inputs is not None), labels=labels)


@dataclass
class MultiViewImages:
    """Generated views: ``rgb`` and ``normal`` ``(M, N, 3, S, S)`` in [0, 1] (normals encoded as
    ``n * 0.5 + 0.5``), for M conditioning images."""

    rgb: torch.Tensor
    normal: torch.Tensor


def _ema_multi_avg_fn(decay: float, warmup: bool) -> Callable:
    """EMA update for ``AveragedModel``: ``ema = d * ema + (1 - d) * current``.

    With ``warmup`` the decay ramps as ``min(decay, (1 + k) / (10 + k))`` after k updates, so
    the average does not stay stuck at the initial weights in short runs.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        k = float(num_averaged)
        d = min(decay, (1.0 + k) / (10.0 + k)) if warmup else decay
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)

    return update


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class MultiViewDiffusion(GenerativeModule):
    """Image-conditioned multi-view RGB + normal-map diffusion (see the module docstring).

    Args:
        unet: the multi-view UNet (:func:`~genlab.models.mv_diffusion.networks.build_unet`).
        vae, image_encoder: frozen ``AutoencoderKL`` and ``CLIPVisionModelWithProjection``.
        noise_scheduler: a diffusers training scheduler (``DDPMScheduler``); its config gives
            ``prediction_type`` and the betas, and builds the DDIM sampler.
        optimizer, scheduler: ``_partial_`` optimizer / LR scheduler factories; the LR
            scheduler steps every ``scheduler_interval`` (``step`` or ``epoch``).
        camera_lr_mult: learning-rate multiplier of the camera projection (new weights that
            must learn fast while the pretrained UNet moves slowly).
        num_views: views N per object (the data must give the same number).
        image_size: image side for :meth:`sample` (training uses the batch's size).
        mvcd_attention, cd_attention_mid, cd_attention_last: attention switches, see
            :func:`genlab.nn.multiview_attention.install_multiview_attention`.
        input_elevation, view_elevations, view_azimuths: the default camera layout of
            :meth:`sample` (degrees; views relative to the input, see :func:`camera_layout`).
        lpips: ``auto`` (on when the backbone weights are available, else a warning),
            ``true`` (missing weights are an error), ``false``.
    """

    frozen_modules = ("vae", "image_encoder", "lpips")

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        image_encoder: torch.nn.Module,
        noise_scheduler: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        camera_lr_mult: float = 1.0,
        pretrained: str | None = None,
        num_views: int = 6,
        image_size: int = 256,
        mvcd_attention: bool = True,
        cd_attention_mid: bool = True,
        cd_attention_last: bool = False,
        shared_timesteps: bool = True,
        cond_dropout: float = 0.05,
        cond_dropout_mode: str = "joint",
        snr_gamma: float | None = None,
        trainable_modules: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        sample_with_ema: bool = True,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        input_elevation: float = 0.0,
        view_elevations: Sequence[float] | None = None,
        view_azimuths: Sequence[float] | None = None,
        num_val_objects: int = 4,
        val_seed: int = 0,
        lpips: str | bool = "auto",
        lpips_net: str = "alex",
        vae_batch_size: int = 32,
        samples_dir: str | None = None,
        main_metric: str = "val/loss",
        main_metric_mode: str = "min",
    ) -> None:
        super().__init__()
        lpips = str(lpips).lower()
        if lpips not in LPIPS_MODES:
            raise ValueError(f"lpips must be one of {LPIPS_MODES}, got {lpips!r}")
        if cond_dropout_mode not in ("joint", "independent"):
            raise ValueError(
                f"cond_dropout_mode must be 'joint' or 'independent', got {cond_dropout_mode!r}"
            )
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be step or epoch, got {scheduler_interval}")
        prediction = noise_scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction!r}")
        view_elevations = (
            list(view_elevations) if view_elevations is not None else [0.0] * num_views
        )
        view_azimuths = (
            list(view_azimuths)
            if view_azimuths is not None
            else [360.0 * i / num_views for i in range(num_views)]
        )
        if len(view_elevations) != num_views or len(view_azimuths) != num_views:
            raise ValueError(
                f"view_elevations ({len(view_elevations)}) and view_azimuths "
                f"({len(view_azimuths)}) must have num_views={num_views} entries"
            )
        camera_layout(input_elevation, view_elevations, view_azimuths)  # validates
        in_ch = unet.config.in_channels
        latent_ch = vae.config.latent_channels
        if in_ch != 2 * latent_ch:
            raise ValueError(
                f"the UNet takes {in_ch} input channels; it needs 2 x {latent_ch} (noisy latent "
                "+ conditioning latent)"
            )
        proj = getattr(image_encoder.config, "projection_dim", None)
        if proj != unet.config.cross_attention_dim:
            raise ValueError(
                f"the image encoder gives {proj}-dim embeddings, the UNet cross-attends to "
                f"{unet.config.cross_attention_dim}"
            )
        self.save_hyperparameters(
            ignore=["unet", "vae", "image_encoder", "noise_scheduler", "optimizer", "scheduler"]
        )
        # plain Python values only: checkpoints must load with weights_only=True
        self.hparams.view_elevations = [float(v) for v in view_elevations]
        self.hparams.view_azimuths = [float(v) for v in view_azimuths]
        self.hparams.trainable_modules = (
            [str(s) for s in trainable_modules] if trainable_modules else None
        )
        self.hparams.lpips = lpips
        self.main_metric = main_metric
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.processors = install_multiview_attention(
            self.unet,
            num_views,
            mvcd_attention=mvcd_attention,
            cd_attention_mid=cd_attention_mid,
            cd_attention_last=cd_attention_last,
        )
        if trainable_modules:
            patterns = list(trainable_modules)
            for name, p in self.unet.named_parameters():
                p.requires_grad_(any(s in name for s in patterns))
            n_train = sum(p.numel() for p in self.unet.parameters() if p.requires_grad)
            if n_train == 0:
                raise ValueError(f"trainable_modules={patterns} matches no UNet parameter")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema_unet: torch.optim.swa_utils.AveragedModel | None = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
            self.ema_unet = torch.optim.swa_utils.AveragedModel(
                self.unet, multi_avg_fn=_ema_multi_avg_fn(ema_decay, ema_warmup)
            )
            self.ema_unet.requires_grad_(False)
        self.lpips: torch.nn.Module | None = None
        self._lpips_checked = False
        self._unet_batch_logged = False
        self._ema_step = -1
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._val_objects = 0

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.hparams.num_views)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def train(self, mode: bool = True) -> MultiViewDiffusion:
        super().train(mode)
        self.vae.eval()
        self.image_encoder.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    # ---- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """VAE latents x ``scaling_factor`` of ``(K, 3, S, S)`` images in [-1, 1].

        ``sample``: a draw from the latent distribution (targets), else its mode (conditioning).
        """
        chunks = []
        dtype = next(self.vae.parameters()).dtype
        for part in pixels.split(max(1, int(self.hparams.vae_batch_size))):
            dist = self.vae.encode(part.to(dtype)).latent_dist
            chunks.append(dist.sample() if sample else dist.mode())
        return torch.cat(chunks) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(K, 4, h, w)`` latents -> images ``(K, 3, S, S)`` in [0, 1]."""
        dtype = next(self.vae.parameters()).dtype
        chunks = [
            self.vae.decode(part.to(dtype) / self.vae.config.scaling_factor).sample
            for part in latents.split(max(1, int(self.hparams.vae_batch_size)))
        ]
        return ((torch.cat(chunks).float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_image(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP ``image_embeds`` ``(K, P)`` of CLIP-normalised images ``(K, 3, C, C)``."""
        size = self.image_encoder.config.image_size
        if clip_pixels.shape[-1] != size or clip_pixels.shape[-2] != size:
            clip_pixels = F.interpolate(
                clip_pixels, size=(size, size), mode="bicubic", align_corners=False
            )
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values=clip_pixels.to(dtype)).image_embeds

    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(K, 3, H, W)`` in [0, 1] -> CLIP input (encoder size, CLIP mean/std)."""
        size = self.image_encoder.config.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        """Per-object ``(B, ...)`` -> per UNet sample ``(B * 2 * N, ...)``."""
        return x.repeat_interleave(len(DOMAINS) * self.num_views, dim=0)

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        x = batch["image_target_vae"]
        if x.ndim != 5 or x.shape[2] != 3:
            raise ValueError(
                f"expected image_target_vae of shape (B, N, 3, S, S), got {tuple(x.shape)}"
            )
        b, n = x.shape[:2]
        if n != self.num_views:
            raise ValueError(
                f"the batch has {n} views per object but model.num_views={self.num_views} (the "
                f"attention layers are built for it): set data.num_views={self.num_views} or "
                f"model.num_views={n}"
            )
        side = x.shape[-1]
        if side % self.vae_scale_factor:
            raise ValueError(
                f"image size {side} is not a multiple of the VAE's downsampling "
                f"{self.vae_scale_factor}"
            )
        return b, n

    def unet_batch(
        self, batch: dict[str, torch.Tensor], sample_targets: bool = True
    ) -> dict[str, torch.Tensor]:
        """The UNet-side tensors of a data batch (order in the module docstring).

        Returns ``latents`` ``(B*2*N, 4, h, w)`` (drawn from the VAE's latent distribution, or
        its mode when not ``sample_targets``), ``cond_latents`` ``(B, 4, h, w)``,
        ``image_embeds`` ``(B, P)`` and ``class_labels`` ``(B*2*N, 10)``.
        """
        self._check_batch(batch)
        targets = interleave_domains(batch["image_target_vae"], batch["normal_target_vae"])
        class_labels = interleave_domains(batch["camera_embed_image"], batch["camera_embed_normal"])
        return {
            "latents": self.encode_latents(targets, sample=sample_targets),
            "cond_latents": self.encode_latents(batch["image_cond_vae"][:, 0], sample=False),
            "image_embeds": self.encode_image(batch["image_cond_CLIP"][:, 0]),
            "class_labels": class_labels.float(),
        }

    # ---- loss ----------------------------------------------------------------------------
    def _drop_masks(
        self, b: int, device: torch.device, p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-object keep masks (CLIP embedding, conditioning latent) for conditioning dropout."""
        if p <= 0:
            ones = torch.ones(b, device=device)
            return ones, ones
        if self.hparams.cond_dropout_mode == "joint":
            keep = (torch.rand(b, device=device) >= p).float()
            return keep, keep
        return (
            (torch.rand(b, device=device) >= p).float(),
            (torch.rand(b, device=device) >= p).float(),
        )

    def unet_forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond_latents: torch.Tensor,
        image_embeds: torch.Tensor,
        class_labels: torch.Tensor,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """UNet prediction for ``(B*2*N)`` noisy latents; per-object conditioning is expanded here."""
        unet = unet if unet is not None else self.unet
        model_input = torch.cat([noisy, self.per_image(cond_latents).to(noisy.dtype)], dim=1)
        context = self.per_image(image_embeds)[:, None, :]
        return unet(
            model_input, timesteps, encoder_hidden_states=context, class_labels=class_labels
        ).sample

    def diffusion_loss(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        cond_dropout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Diffusion losses of a data batch: ``loss`` and per domain ``loss_rgb``, ``loss_normal``.

        ``generator`` (a CPU generator) fixes noise and timesteps, and the target latents are
        then the VAE's mode (validation: the same loss every epoch for the same weights);
        otherwise the global RNG is used. ``cond_dropout`` defaults to the configured
        probability.
        """
        inputs = self.unet_batch(batch, sample_targets=generator is None)
        latents = inputs["latents"]
        total = latents.shape[0]
        b = total // (len(DOMAINS) * self.num_views)
        device = latents.device
        sched = self.noise_scheduler
        num_train = sched.config.num_train_timesteps
        n_t = b if self.hparams.shared_timesteps else total
        if generator is not None:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = torch.randint(0, num_train, (n_t,), generator=generator).to(device)
        else:
            noise = torch.randn_like(latents)
            t = torch.randint(0, num_train, (n_t,), device=device)
        timesteps = self.per_image(t) if self.hparams.shared_timesteps else t
        noisy = sched.add_noise(latents, noise, timesteps)
        p = self.hparams.cond_dropout if cond_dropout is None else cond_dropout
        keep_clip, keep_latent = self._drop_masks(b, device, p)
        image_embeds = inputs["image_embeds"] * keep_clip[:, None].to(inputs["image_embeds"].dtype)
        cond_latents = inputs["cond_latents"] * keep_latent[:, None, None, None]
        pred = self.unet_forward(
            noisy, timesteps, cond_latents, image_embeds, inputs["class_labels"]
        )
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = self._snr_weights(timesteps)
        weighted = per_sample * weights
        by_domain = weighted.view(b, len(DOMAINS), self.num_views).mean(dim=(0, 2))
        return {
            "loss": weighted.mean(),
            "loss_rgb": by_domain[0],
            "loss_normal": by_domain[1],
        }

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=float(gamma))
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        if self.prediction_type == "epsilon":
            return clipped / snr.clamp_min(1e-8)
        return clipped

    # ---- training ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.diffusion_loss(batch)
        b = batch["image_target_vae"].shape[0]
        if not self._unet_batch_logged:
            self._log_unet_batch(b, b * len(DOMAINS) * self.num_views)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()},
            on_step=True,
            on_epoch=True,
            batch_size=b,
        )
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=b)
        return losses["loss"]

    def _log_unet_batch(self, objects: int, total: int) -> None:
        self._unet_batch_logged = True
        log.info(
            "UNet batch: %d objects x %d domains x %d views = %d images per step",
            objects,
            len(DOMAINS),
            self.num_views,
            total,
        )
        self.hparams["unet_batch_size"] = total
        if self._trainer is not None:
            for logger in self.loggers:
                logger.log_hyperparams({"model/unet_batch_size": total})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_unet is not None and self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step
            self.ema_unet.update_parameters(self.unet)

    @property
    def sampling_unet(self) -> torch.nn.Module:
        """The EMA UNet when there is one (and ``sample_with_ema``), else the trained UNet."""
        if self.ema_unet is not None and self.hparams.sample_with_ema:
            return self.ema_unet.module
        return self.unet

    def configure_optimizers(self):
        camera, rest = [], []
        for name, p in self.unet.named_parameters():
            if p.requires_grad:
                (camera if name.startswith("class_embedding.") else rest).append(p)
        mult = float(self.hparams.camera_lr_mult)
        if mult == 1.0 or not camera:
            optimizer = self.optimizer_factory(camera + rest)
        else:
            optimizer = self.optimizer_factory(rest)
            base_lr = optimizer.param_groups[0]["lr"]
            optimizer.add_param_group({"params": camera, "lr": base_lr * mult})
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer),
                "interval": self.hparams.scheduler_interval,
            },
        }

    # ---- LPIPS ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = getattr(self._trainer, "strategy", None)
        used = self.ema_unet is not None
        refuse_under_sharding(strategy, used, "model.ema_decay=null", EMA_SEES_A_SHARD)
        if stage in ("fit", "validate"):
            self._setup_lpips()

    def _setup_lpips(self) -> None:
        """Build LPIPS once (``lpips=auto|true``); offline without its backbone: warn or raise."""
        if self._lpips_checked or self.hparams.lpips == "false":
            return
        self._lpips_checked = True
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            metric = LearnedPerceptualImagePatchSimilarity(
                net_type=self.hparams.lpips_net, normalize=True
            )
        except Exception as err:  # noqa: BLE001 - download / IO / missing-package failures alike
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            if self.hparams.lpips == "true":
                raise WeightsUnavailableError(
                    f"LPIPS needs the torchvision {self.hparams.lpips_net} backbone weights, "
                    f"which are not available here ({reason}). Put them in the torch hub cache "
                    f"({torch.hub.get_dir()}/checkpoints) where there is internet access, or set "
                    "model.lpips=auto or model.lpips=false to train without LPIPS."
                ) from err
            log.warning(
                "LPIPS is off: its %s backbone weights could not be loaded (%s). Validation "
                "logs PSNR and SSIM only; set model.lpips=false to silence this.",
                self.hparams.lpips_net,
                reason,
            )
            return
        self.lpips = metric.requires_grad_(False).eval()

    # ---- validation ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        self._val_objects = 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seed = int(self.hparams.val_seed)
        losses = self.diffusion_loss(
            batch, generator=torch.Generator().manual_seed(seed + batch_idx), cond_dropout=0.0
        )
        b = batch["image_target_vae"].shape[0]
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()},
            batch_size=b,
            sync_dist=True,
            prog_bar=False,
        )
        if self.trainer.sanity_checking:
            return
        k = min(b, int(self.hparams.num_val_objects) - self._val_objects)
        if k <= 0:
            return
        out = self.generate_views(
            batch["image_cond"][:k, 0],
            batch["camera_embed_image"][:k],
            batch["camera_embed_normal"][:k],
            clip_pixels=batch["image_cond_CLIP"][:k, 0],
            generator=torch.Generator().manual_seed(seed + 10_000 + batch_idx),
        )
        self._val_objects += k
        self._log_image_metrics(out, batch, k)
        self._val_outputs.append(
            {
                "inputs": batch["image_cond"][:k, 0].detach().float().cpu(),
                "rgb": out.rgb.cpu(),
                "normal": out.normal.cpu(),
                "target_rgb": batch["image_target"][:k].detach().float().cpu(),
                "target_normal": batch["normal_target"][:k].detach().float().cpu(),
            }
        )

    def _log_image_metrics(self, out: MultiViewImages, batch: dict, k: int) -> None:
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        metrics: dict[str, torch.Tensor] = {}
        for name, pred, key in (
            ("rgb", out.rgb, "image_target"),
            ("normal", out.normal, "normal_target"),
        ):
            p = pred.flatten(0, 1).float()
            t = batch[key][:k].flatten(0, 1).float().to(p.device)
            metrics[f"val/psnr_{name}"] = peak_signal_noise_ratio(
                p, t, data_range=1.0, dim=(1, 2, 3)
            )
            metrics[f"val/ssim_{name}"] = structural_similarity_index_measure(p, t, data_range=1.0)
            if self.lpips is not None:
                self.lpips.to(p.device)
                metrics[f"val/lpips_{name}"] = self.lpips(p, t)
                self.lpips.reset()
        self.log_dict(metrics, batch_size=k * self.num_views, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs or not self.trainer.is_global_zero:
            self._val_outputs = []
            return
        cat = {key: torch.cat([o[key] for o in self._val_outputs]) for key in self._val_outputs[0]}
        self._val_outputs = []
        root = Path(self.hparams.samples_dir or Path(self.trainer.default_root_dir) / "samples")
        out_dir = root / f"step_{self.global_step:06d}"
        grid = write_views(
            out_dir,
            cat["rgb"],
            cat["normal"],
            cat["inputs"],
            cat["target_rgb"],
            cat["target_normal"],
        )
        from genlab.loggers.media import log_image

        with Image.open(grid) as image:
            log_image(self.loggers, "val/views", image.copy(), self.global_step)
        log.info("validation views of step %d written to %s", self.global_step, out_dir)

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_views(
        self,
        cond_pixels: torch.Tensor,
        camera_embed_image: torch.Tensor,
        camera_embed_normal: torch.Tensor,
        clip_pixels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        unconditional: torch.Tensor | None = None,
    ) -> MultiViewImages:
        """Sample N RGB views and N normal maps for each of M conditioning images.

        Args:
            cond_pixels: ``(M, 3, S, S)`` in [0, 1]; S sets the output size.
            camera_embed_image, camera_embed_normal: ``(M, N, 10)`` or ``(N, 10)``.
            clip_pixels: ``(M, 3, C, C)`` CLIP-normalised; made from ``cond_pixels`` if None.
            generator: a CPU generator for the initial noise (reproducible on any device).
            num_inference_steps, guidance_scale: DDIM steps and classifier-free guidance
                (> 1 enables it); default to the configured values.
            unconditional: ``(M,)`` bool, items sampled without conditioning.
        """
        from diffusers import DDIMScheduler

        steps = int(num_inference_steps or self.hparams.num_inference_steps)
        scale = float(self.hparams.guidance_scale if guidance_scale is None else guidance_scale)
        was_training = self.training
        self.eval()
        try:
            device = self.device
            m = cond_pixels.shape[0]
            n = self.num_views
            cams = []
            for emb in (camera_embed_image, camera_embed_normal):
                emb = emb.to(device).float()
                if emb.ndim == 2:
                    emb = emb.expand(m, -1, -1)
                if emb.shape[:2] != (m, n):
                    raise ValueError(
                        f"camera embeddings of shape {tuple(emb.shape)}, expected ({m}, {n}, 10)"
                    )
                cams.append(emb)
            class_labels = interleave_domains(*cams)
            cond_pixels = cond_pixels.to(device).float()
            if clip_pixels is None:
                clip_pixels = self.clip_pixels(cond_pixels)
            cond_latents = self.encode_latents(cond_pixels * 2.0 - 1.0, sample=False)
            image_embeds = self.encode_image(clip_pixels.to(device))
            if unconditional is not None:
                keep = (~unconditional.to(device).bool()).float()
                cond_latents = cond_latents * keep[:, None, None, None]
                image_embeds = image_embeds * keep[:, None].to(image_embeds.dtype)
            sampler = DDIMScheduler.from_config(self.noise_scheduler.config)
            sampler.set_timesteps(steps, device=device)
            side = cond_pixels.shape[-1] // self.vae_scale_factor
            shape = (m * len(DOMAINS) * n, self.vae.config.latent_channels, side, side)
            latents = torch.randn(shape, generator=generator).to(device) * sampler.init_noise_sigma
            guided = scale > 1.0
            if guided:
                cond_latents = torch.cat([torch.zeros_like(cond_latents), cond_latents])
                image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
                class_labels = torch.cat([class_labels, class_labels])
            unet = self.sampling_unet
            for t in sampler.timesteps:
                x = torch.cat([latents, latents]) if guided else latents
                x = sampler.scale_model_input(x, t)
                timesteps = t.expand(x.shape[0]).to(device)
                pred = self.unet_forward(
                    x, timesteps, cond_latents, image_embeds, class_labels, unet=unet
                ).float()
                if guided:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + scale * (cond - uncond)
                latents = sampler.step(pred, t, latents).prev_sample
            images = self.decode_latents(latents)
            images = images.view(m, len(DOMAINS), n, *images.shape[1:])
            return MultiViewImages(rgb=images[:, 0].contiguous(), normal=images[:, 1].contiguous())
        finally:
            self.train(was_training)

    def default_camera_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera embeddings of the configured layout (``input_elevation``, ``view_*``)."""
        hp = self.hparams
        return camera_layout(hp.input_elevation, hp.view_elevations, hp.view_azimuths)

    def condition_tensor(
        self, condition: Any, background: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> torch.Tensor | None:
        """A conditioning image ``(3, S, S)`` in [0, 1] from a path, PIL image or tensor.

        ``""`` / ``None`` mean no conditioning image (None is returned).
        """
        size = int(self.hparams.image_size)
        if condition is None or (isinstance(condition, str) and not condition.strip()):
            return None
        if isinstance(condition, torch.Tensor):
            x = condition.float()
            if x.ndim != 3 or x.shape[0] != 3:
                raise ValueError(f"a conditioning tensor must be (3, H, W), got {tuple(x.shape)}")
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
            return x.clamp(0, 1)
        if isinstance(condition, (str, Path)):
            from genlab.data.images import read_image

            condition = read_image(condition, "RGBA")
        if isinstance(condition, Image.Image):
            return _to_tensor(prepare_condition_image(condition, size, background))
        raise TypeError(f"unsupported conditioning input {type(condition).__name__}")

    def sample(
        self,
        prompts: Sequence[Any],
        num_per_prompt: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Sample]:
        """Views for each conditioning image (path, PIL image or ``(3, H, W)`` tensor).

        An empty string samples without a conditioning image (the unconditional model that
        conditioning dropout trains). Returns, per condition and per repeat, 2N
        :class:`~genlab.samples.Sample` s with images: the N RGB views, then the N normal
        maps, in the configured camera layout; their prompts read ``"<name> rgb view 3"``.
        """
        cam_image, cam_normal = self.default_camera_layout()
        samples: list[Sample] = []
        size = int(self.hparams.image_size)
        for k, condition in enumerate(prompts):
            pixels = self.condition_tensor(condition)
            uncond = pixels is None
            if uncond:
                pixels = torch.ones(3, size, size)
            name = _condition_name(condition, k)
            out = self.generate_views(
                pixels[None].expand(num_per_prompt, -1, -1, -1),
                cam_image,
                cam_normal,
                generator=generator,
                unconditional=torch.full((num_per_prompt,), uncond),
            )
            for i in range(num_per_prompt):
                for domain, views in zip(DOMAINS, (out.rgb, out.normal), strict=True):
                    for v in range(self.num_views):
                        samples.append(
                            Sample(
                                f"{name} {domain} view {v}".strip(), i, image=_to_pil(views[i, v])
                            )
                        )
        return samples


def _condition_name(condition: Any, k: int) -> str:
    if condition is None or (isinstance(condition, str) and not condition.strip()):
        return ""
    if isinstance(condition, (str, Path)):
        return Path(condition).stem
    return f"image {k}"


def write_views(
    out_dir: str | Path,
    rgb: torch.Tensor,
    normal: torch.Tensor,
    inputs: torch.Tensor | None = None,
    target_rgb: torch.Tensor | None = None,
    target_normal: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Write ``<name>_rgb_XX.png``, ``<name>_normal_XX.png`` (+ ``<name>_input.png``) per object
    and ``grid.png`` (:func:`views_grid`) to ``out_dir``; returns the grid's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m, n = rgb.shape[:2]
    names = list(names) if names is not None else [f"obj{i:02d}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"{len(names)} names for {m} objects")
    for i, name in enumerate(names):
        if inputs is not None:
            _to_pil(inputs[i]).save(out / f"{name}_input.png")
        for v in range(n):
            _to_pil(rgb[i, v]).save(out / f"{name}_rgb_{v:02d}.png")
            _to_pil(normal[i, v]).save(out / f"{name}_normal_{v:02d}.png")
    grid = out / "grid.png"
    views_grid(rgb, normal, inputs, target_rgb, target_normal).save(grid)
    return grid

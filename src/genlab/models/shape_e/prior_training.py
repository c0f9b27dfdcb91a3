"""Training and sampling maths of the Shap-E latent diffusion prior, consistent with diffusers.

Shap-E samples with ``HeunDiscreteScheduler`` (released config: ``beta_schedule="exp"`` over
1024 training steps, Karras sigmas, ``prediction_type="sample"``, predictions clipped to
[-1, 1]). In the scheduler's variance-exploding view a noisy latent is ``x0 + sigma * eps``
with ``sigma = sqrt((1 - abar) / abar)``; the prior sees it divided by ``sqrt(sigma^2 + 1)``
(``scale_model_input``) together with the *timestep value* of that sigma (a fractional index
into the 1024 training steps, log-linearly interpolated from the sigma: ``_sigma_to_t``), and
predicts ``2 * D`` channels per token, of which the first ``D`` are the clean latent (the rest,
a variance, is dropped). Training here does exactly the same:

- draw a training timestep ``t`` (an integer of the 1024, ``discrete``, or a real number in
  ``[0, 1023]``, ``continuous``) and its sigma (:class:`SigmaSchedule`);
- ``x_t = x0 + sigma * eps``; model input ``x_t / sqrt(sigma^2 + 1)``, which is the DDPM
  ``sqrt(abar) x0 + sqrt(1 - abar) eps`` of the original Shap-E training at integer ``t``;
- call the prior with ``timestep=t`` and the conditioning the pipelines build
  (:func:`text_condition`, :func:`image_condition`; zeros for the unconditional branch, which
  :func:`drop_condition` substitutes with probability ``cond_dropout`` for classifier-free
  guidance);
- regress the first ``D`` output channels on the scheduler's target: ``x0`` for ``sample``
  (``epsilon`` and ``v_prediction`` are supported for a custom scheduler config), MSE,
  optionally min-SNR-weighted.

:func:`sample_latents` is the denoising loop of ``ShapEPipeline`` / ``ShapEImg2ImgPipeline``
over given parts (same noise draw, guidance and scheduler calls), so a trained prior is
sampled exactly as the pipelines would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PREDICTION_TYPES",
    "TIMESTEP_SAMPLING",
    "NoisedBatch",
    "SigmaSchedule",
    "add_noise_for_training",
    "diffusion_training_target",
    "drop_condition",
    "image_condition",
    "prior_loss",
    "sample_latents",
    "sample_timesteps",
    "text_condition",
]

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("discrete", "continuous")
TimestepSampling = Literal["discrete", "continuous"]


# ------------------------------------------------------------------------------ noise schedule


class SigmaSchedule:
    """The sigmas of a diffusers sigma-space scheduler's *training* schedule.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` for the integer training steps ``t`` (from the
    scheduler's ``alphas_cumprod``). Between integers, as the sampler relates them: with
    Karras (or exponential / beta) sigmas, linearly in ``log sigma``, the exact inverse of the
    scheduler's ``_sigma_to_t`` that maps the sampling sigmas to the fractional timestep values
    the prior is called with; otherwise linearly in sigma (``np.interp`` of ``set_timesteps``).
    """

    def __init__(self, scheduler: Any) -> None:
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None or not hasattr(scheduler, "scale_model_input"):
            raise TypeError(
                f"{type(scheduler).__name__} is not a sigma-space scheduler with alphas_cumprod "
                "(use HeunDiscreteScheduler, as Shap-E does, or another Karras-family scheduler)"
            )
        # the scheduler's own arithmetic (float32 torch, then numpy), so the values agree bit
        # for bit with what set_timesteps / _sigma_to_t compute
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        self.log_sigmas_np = np.log(sigmas)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self.log_sigmas = torch.from_numpy(self.log_sigmas_np.astype(np.float32))
        self.num_train_timesteps = len(sigmas)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        config = getattr(scheduler, "config", {})
        self.log_interpolation = any(
            bool(config.get(k, False))
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        )

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.sigmas.to(device), self.log_sigmas.to(device))
        return self._on_device[device]

    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Sigma of (possibly fractional) timestep values in ``[0, N - 1]``, on their device."""
        table, logs = self._tables(timesteps.device)
        if not torch.is_floating_point(timesteps):  # integer steps: a table lookup
            return table[timesteps.clamp(0, self.num_train_timesteps - 1)]
        t = timesteps.detach().float().clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        if self.log_interpolation:
            between = torch.lerp(logs[low], logs[low + 1], w).exp()
        else:
            between = torch.lerp(table[low], table[low + 1], w)
        # integer steps: the table value itself, no rounding error
        return torch.where(t == t.round(), table[t.round().long()], between)

    def timestep_for(self, sigmas: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
        """The timestep values the scheduler passes to the model for ``sigmas`` (``_sigma_to_t``)."""
        sigma = np.asarray(torch.as_tensor(sigmas).detach().cpu().numpy())
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - self.log_sigmas_np[:, np.newaxis]
        low_idx = (
            np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=self.log_sigmas_np.shape[0] - 2)
        )
        high_idx = low_idx + 1
        low = self.log_sigmas_np[low_idx]
        high = self.log_sigmas_np[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        t = ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)
        return torch.from_numpy(np.asarray(t)).to(torch.float32)


def sample_timesteps(
    batch_size: int,
    schedule: SigmaSchedule,
    generator: torch.Generator | None = None,
    mode: TimestepSampling = "discrete",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps ``(B,)``: uniform integers of ``[0, N)`` (``discrete``, int64, the
    original Shap-E objective) or uniform reals in ``[0, N - 1]`` (``continuous``, float32,
    which also covers the fractional values the Karras sampler visits)."""
    n = schedule.num_train_timesteps
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if mode == "discrete":
        t = torch.randint(0, n, (batch_size,), generator=generator, device=gen_device)
    elif mode == "continuous":
        t = torch.rand(batch_size, generator=generator, device=gen_device) * (n - 1)
    else:
        raise ValueError(f"timestep sampling {mode!r}: one of {TIMESTEP_SAMPLING}")
    return t.to(device)


# ------------------------------------------------------------------------------ noising, target


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise_for_training(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, model_input)``: ``x_t = x0 + sigma * eps`` (``scheduler.add_noise``) and the
    prior's input ``x_t / sqrt(sigma^2 + 1)`` (``scheduler.scale_model_input``)."""
    sigma = _per_sample(sigmas, latents)
    noisy = latents + noise * sigma
    return noisy, noisy / ((sigma**2 + 1) ** 0.5)


@dataclass
class NoisedBatch:
    """One training batch noised: the prior's inputs and what its first ``D`` channels regress."""

    model_input: torch.Tensor  # (B, N, D): x_t / sqrt(sigma^2 + 1)
    timesteps: torch.Tensor  # (B,) float: the value passed as ``timestep=``
    target: torch.Tensor  # (B, N, D)
    sigmas: torch.Tensor  # (B,)
    noisy: torch.Tensor  # (B, N, D): x_t


def diffusion_training_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: SigmaSchedule,
    prediction_type: str = "sample",
) -> NoisedBatch:
    """Noise ``latents`` at ``timesteps`` and give the target of ``prediction_type``.

    The targets are what makes ``HeunDiscreteScheduler.step`` recover ``x0`` from the model
    output: ``sample`` -> ``x0``; ``epsilon`` -> ``eps``; ``v_prediction`` ->
    ``(eps - sigma x0) / sqrt(sigma^2 + 1)``.
    """
    if latents.shape != noise.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} differ")
    sigmas = schedule.sigma_at(timesteps).to(latents.device)
    noisy, model_input = add_noise_for_training(latents, noise, sigmas)
    if prediction_type == "sample":
        target = latents
    elif prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        sigma = _per_sample(sigmas, latents)
        target = (noise - sigma * latents) / ((sigma**2 + 1) ** 0.5)
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: one of {PREDICTION_TYPES}")
    timesteps = timesteps.to(device=latents.device, dtype=torch.float32)
    return NoisedBatch(model_input, timesteps, target, sigmas, noisy)


def prior_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "sample",
) -> torch.Tensor:
    """MSE between the first ``D`` channels of the prior's ``(B, N, 2D)`` output and ``target``.

    ``snr_gamma``: min-SNR-gamma weighting (SNR = 1 / sigma^2): per-sample weight on the x0
    error ``min(SNR, gamma)``, i.e. ``min(SNR, gamma)`` for ``sample``, ``/ SNR`` for
    ``epsilon`` and ``/ (SNR + 1)`` for ``v_prediction``. None: the plain mean.
    """
    dim = target.shape[-1]
    if prediction.shape[-1] not in (dim, 2 * dim) or prediction.shape[:-1] != target.shape[:-1]:
        raise ValueError(
            f"prior output {tuple(prediction.shape)} does not fit target {tuple(target.shape)} "
            f"(expected (..., {dim}) or (..., {2 * dim}): mean and variance channels)"
        )
    mean = prediction[..., :dim].float()
    if snr_gamma is None:
        return F.mse_loss(mean, target.float())
    per_sample = F.mse_loss(mean, target.float(), reduction="none").flatten(1).mean(1)
    if sigmas is None:
        raise ValueError("snr_gamma needs the sigmas of the batch")
    snr = 1.0 / sigmas.float().to(per_sample.device) ** 2
    weight = torch.minimum(snr, torch.full_like(snr, float(snr_gamma)))
    if prediction_type == "epsilon":
        weight = weight / snr
    elif prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    return (weight * per_sample).mean()


# ------------------------------------------------------------------------------ conditioning


@torch.no_grad()
def text_condition(
    text_encoder: Any, tokenizer: Any, prompts: Sequence[str], device: torch.device | None = None
) -> torch.Tensor:
    """``(B, P)``: ``ShapEPipeline._encode_prompt`` for ``prompts`` (no guidance branch).

    CLIP's projected ``text_embeds``, normalised to unit length, times ``sqrt(P)``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    device = device or text_encoder.device
    tokenizer.pad_token_id = 0  # as the pipeline sets it
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    embeds = text_encoder(ids.to(device)).text_embeds
    embeds = embeds / torch.linalg.norm(embeds, dim=-1, keepdim=True)
    return math.sqrt(embeds.shape[1]) * embeds


def images_to_pixels(image_processor: Any, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    """CLIP pixel values of ``images``: a ``(B, 3, H, W)`` float tensor in [0, 1] (as the
    objaverse batches hold them), or PIL images; resized/cropped/normalised by the processor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = list(arrays.permute(0, 2, 3, 1).cpu().numpy())
    return image_processor(images=list(images), return_tensors="pt").pixel_values


@torch.no_grad()
def image_condition(
    image_encoder: Any, pixel_values: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """``(B, T, H)``: ``ShapEImg2ImgPipeline._encode_image``: the CLIP vision tower's
    ``last_hidden_state`` without the class token (256 x 1024 for ViT-L/14 at 224 px)."""
    device = device or image_encoder.device
    pixel_values = pixel_values.to(device=device, dtype=image_encoder.dtype)
    hidden = image_encoder(pixel_values)["last_hidden_state"]
    return hidden[:, 1:, :].contiguous()


def drop_condition(
    condition: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance dropout: each row replaced, with ``probability``, by the zeros
    the pipelines feed the unconditional branch. Returns ``(condition, dropped)`` (bool ``(B,)``)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1], got {probability}")
    if probability == 0.0:
        return condition, torch.zeros(condition.shape[0], dtype=torch.bool, device=condition.device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand(condition.shape[0], generator=generator, device=gen_device)
    dropped = (draw < probability).to(condition.device)
    mask = dropped.reshape(-1, *([1] * (condition.ndim - 1)))
    return torch.where(mask, torch.zeros_like(condition), condition), dropped


# ------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample_latents(
    prior: Any,
    scheduler: Any,
    condition: torch.Tensor,
    guidance_scale: float = 15.0,
    num_inference_steps: int = 64,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    num_per_condition: int = 1,
) -> torch.Tensor:
    """Latents ``(B * num_per_condition, N, D)`` for ``condition`` (``(B, P)`` text or
    ``(B, T, H)`` image), by the denoising loop of ``ShapEPipeline.__call__``.

    Same initial noise (``randn_tensor`` of ``(B, N * D)`` times ``init_noise_sigma``), same
    guidance (zeros as the unconditional condition, batched in front, used when
    ``guidance_scale > 1``), same scheduler calls. ``scheduler`` is not modified: a fresh copy
    from its config runs the loop.
    """
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = type(scheduler).from_config(scheduler.config)
    device = condition.device
    condition = condition.repeat_interleave(num_per_condition, dim=0)
    batch = condition.shape[0]
    guided = guidance_scale > 1.0
    if guided:
        condition = torch.cat([torch.zeros_like(condition), condition])
    scheduler.set_timesteps(num_inference_steps, device=device)
    num_embeddings = int(prior.config.num_embeddings)
    embedding_dim = int(prior.config.embedding_dim)
    shape = (batch, num_embeddings * embedding_dim)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=condition.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"initial latents must be {shape}, got {tuple(latents.shape)}")
    latents = (latents.to(device) * scheduler.init_noise_sigma).reshape(
        batch, num_embeddings, embedding_dim
    )
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        scaled = scheduler.scale_model_input(model_input, t)
        output = prior(scaled, timestep=t, proj_embedding=condition).predicted_image_embedding
        prediction = output[..., :embedding_dim]
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(prediction, timestep=t, sample=latents).prev_sample
    return latents

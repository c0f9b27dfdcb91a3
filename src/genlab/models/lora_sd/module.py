"""DreamBooth LoRA on Stable Diffusion 1.x/2.x and SDXL as a LightningModule.

One step: encode the photos with the VAE, add noise at random timesteps, predict it with the
LoRA-adapted UNet conditioned on the prompt (and, for SDXL, the pooled text embedding and the
size/crop ids), and regress the scheduler's target (noise, or velocity for v-prediction).
With prior preservation the class images of the batch are denoised too and their loss is
added with ``prior_loss_weight``; ``snr_gamma`` applies min-SNR weighting.

Only the LoRA weights train (fp32, also when the frozen base runs in bf16/fp16 on a GPU), and
only they are in checkpoints, with the optimiser state. Noise, timesteps and VAE samples are
drawn from a generator seeded by (seed, rank, epoch, batch), so a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genlab.distributed import SCORER_SEES_A_SHARD, refuse_under_sharding, shards_weights
from genlab.metrics.fidelity_report import (
    FidelityValues,
    fidelity_values,
    write_fidelity_csv,
    write_fidelity_json,
)
from genlab.models.base import GenerativeModule, load_partial_state, plain_name
from genlab.models.lora_sd import lora as lora_io
from genlab.models.lora_sd.components import (
    Components,
    _plain,
    assemble_pipeline,
    build_tiny_components,
    load_components,
)
from genlab.models.lora_sd.lora import LoRASettings
from genlab.samples import Sample

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EXPORT_FORMATS = ("diffusers", "kohya")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_PRIOR_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "class_prompt": "a photo of toy",
    "num_class_images": 100,
    "prior_loss_weight": 1.0,
    "class_dir": None,
    "sample_batch_size": 4,
    "steps": 25,
    "guidance": 7.5,
    "seed": 0,
}
_VALIDATION_DEFAULTS: dict[str, Any] = {
    "prompts": None,
    "num_images": 1,
    "seed": 0,
    "steps": 25,
    "guidance": 7.5,
    "negative_prompt": None,
    "baseline": True,
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif")
_UNSET: Any = object()
BASELINE_FILE = "baseline_metrics.json"


def _options(
    name: str, given: Mapping[str, Any] | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    given = _plain(given) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"model.{name}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


# ---------------------------------------------------------------------------------- loss maths


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023) for each prediction target.

    The weight on the x0 error is ``min(snr, gamma)``; rewritten for the loss the model is
    trained on: epsilon ``min(snr, gamma) / snr``, velocity ``min(snr, gamma) / (snr + 1)``,
    sample ``min(snr, gamma)``.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}; one of {PREDICTION_TYPES}")


def combine_prior_loss(
    per_sample: torch.Tensor, num_instance: int, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, instance, prior)``: instance mean + ``prior_loss_weight`` x class-image mean.

    ``per_sample`` holds the (weighted) losses of the instance items first, then those of the
    class items; with no class items, prior is None and loss is the instance mean.
    """
    instance = per_sample[:num_instance].mean()
    if per_sample.shape[0] == num_instance:
        return instance, instance, None
    prior = per_sample[num_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior


def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning ``(B, 6)``: original (h, w), crop (top, left), target (h, w)."""
    original_size = torch.as_tensor(original_size).reshape(-1, 2)
    crop_top_left = torch.as_tensor(crop_top_left).reshape(-1, 2).to(original_size.device)
    target = torch.tensor(target_size, device=original_size.device).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(torch.float32)


def adamw_8bit(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (``model.optimizer._target_=genlab.models.lora_sd.adamw_8bit``)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "model.optimizer=adamw_8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA "
            "GPU; use torch.optim.AdamW otherwise"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("model.optimizer=adamw_8bit needs a CUDA GPU; use torch.optim.AdamW")
    return bnb.optim.AdamW8bit(params, **kwargs)


def _seeded_generator(device: torch.device, *entropy: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(e) % 2**32 for e in entropy]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images."""
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


# ---------------------------------------------------------------------------------- module


class ValidationDraw(NamedTuple):
    """One validation's samples: the prompts, the LoRA model's and (once) the base model's."""

    prompts: list[str]
    samples: list[Sample]
    baseline: list[Sample] | None


class LoRADreamBooth(GenerativeModule):
    """DreamBooth LoRA fine-tuning of a Stable Diffusion 1.x/2.x or SDXL model.

    Args:
        optimizer: ``_partial_`` optimiser, given only the LoRA parameters.
        pretrained: hub id or local diffusers folder; architecture read from it.
        tiny: instead of ``pretrained``, keyword configs for random-weight components
            (:func:`~genlab.models.lora_sd.components.build_tiny_components`).
        lora: rank, alpha, dropout, target_modules, train_text_encoder,
            text_encoder_target_modules, init (:class:`~genlab.models.lora_sd.lora.LoRASettings`).
        scheduler: ``_partial_`` LR scheduler, called with ``optimizer=``; stepped every
            optimiser step (``num_training_steps`` is filled from the trainer when it takes one).
        resolution: training/sampling size in pixels (SDXL's target size).
        prediction_type: null = the noise scheduler's; else overrides it (also for sampling).
        snr_gamma: min-SNR-gamma weighting (null: plain MSE).
        noise_offset: scale of per-channel offset noise.
        prior_preservation: enabled, class_prompt, num_class_images, prior_loss_weight,
            class_dir, and how class images are sampled (sample_batch_size, steps, guidance, seed).
        validation: prompts (null: the datamodule's ``sample_prompts``), num_images, seed,
            steps, guidance, negative_prompt (used by :meth:`sample` too), and baseline: with
            ``metrics``, also score the base model (LoRA off) once per run on the same prompts
            and seeds (see :meth:`write_validation_samples`).
        sample_scheduler: ``_partial_`` called with the noise scheduler's config (e.g.
            ``diffusers.DPMSolverMultistepScheduler.from_config``); null: the noise scheduler.
        gradient_checkpointing: on the UNet (and trained text encoders).
        weight_dtype: dtype of the frozen base: ``auto`` follows a mixed-precision trainer on
            a GPU (bf16-mixed -> bfloat16, 16-mixed -> float16), float32 elsewhere.
        export_format: files :meth:`export_weights` writes beside ``model.safetensors``.
        metrics: optional scorer called as ``metrics(images=, prompts=, references=)`` after
            validation sampling (e.g. :class:`genlab.metrics.image_similarity.SubjectFidelity`,
            ``model/metrics=subject_fidelity``); the references are the held-out val photos.
            Its means are logged as ``val/<name>`` (the base model's as
            ``val/baseline_<name>``), per-prompt values go to
            ``samples/step_XXXXXX/metrics.csv``. None: no metric.
        seed: seed of the noise streams (null: ``torch.initial_seed()``, i.e. the run's seed).
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        pretrained: str | None = None,
        tiny: Mapping[str, Any] | None = None,
        revision: str | None = None,
        variant: str | None = None,
        lora: Mapping[str, Any] | None = None,
        scheduler: Callable[..., Any] | None = None,
        resolution: int = 512,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        prior_preservation: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        sample_scheduler: Callable[..., Any] | None = None,
        gradient_checkpointing: bool = False,
        weight_dtype: str = "auto",
        export_format: Sequence[str] = ("diffusers",),
        metrics: Callable[..., Any] | None = None,
        seed: int | None = None,
        main_metric: str = "val/loss",
        main_metric_mode: str = "min",
    ) -> None:
        super().__init__()
        settings = LoRASettings.from_mapping(_plain(lora))
        prior = _options("prior_preservation", prior_preservation, _PRIOR_DEFAULTS)
        val = _options("validation", validation, _VALIDATION_DEFAULTS)
        formats = [str(f) for f in (_plain(export_format) or [])]
        bad = sorted(set(formats) - set(EXPORT_FORMATS))
        if bad:
            raise ValueError(f"model.export_format: unknown {bad}; choose from {EXPORT_FORMATS}")
        if prior["enabled"] and not prior["class_dir"]:
            raise ValueError(
                "model.prior_preservation.enabled=true needs model.prior_preservation.class_dir"
            )
        if str(weight_dtype) != "auto" and str(weight_dtype) not in _DTYPES:
            raise ValueError(
                f"model.weight_dtype={weight_dtype!r}: auto or one of {sorted(_DTYPES)}"
            )
        if pretrained is not None and tiny:
            raise ValueError("set either model.pretrained or model.tiny, not both")
        if pretrained is None and not tiny:
            raise ValueError("model.pretrained is null and model.tiny is empty: nothing to build")

        self.save_hyperparameters(
            {
                "pretrained": pretrained,
                "tiny": _plain(tiny),
                "revision": revision,
                "variant": variant,
                "lora": {k: _plain(v) for k, v in vars(settings).items()},
                "resolution": int(resolution),
                "prediction_type": prediction_type,
                "snr_gamma": snr_gamma,
                "noise_offset": float(noise_offset),
                "prior_preservation": prior,
                "validation": val,
                "gradient_checkpointing": bool(gradient_checkpointing),
                "weight_dtype": str(weight_dtype),
                "export_format": formats,
                "main_metric": main_metric,
                "main_metric_mode": main_metric_mode,
            }
        )
        self.lora_settings = settings
        self.prior = prior
        self.validation = val
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sample_scheduler_factory = sample_scheduler
        self.main_metric = main_metric
        self.seed = int(torch.initial_seed() if seed is None else seed)

        if pretrained is not None:
            components = load_components(pretrained, revision=revision, variant=variant)
        else:
            components = build_tiny_components(**_plain(tiny))
        self.components: Components = components
        self.architecture = components.architecture
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizers = components.tokenizers
        self.noise_scheduler = components.noise_scheduler

        if prediction_type is not None:
            if prediction_type not in PREDICTION_TYPES:
                raise ValueError(
                    f"model.prediction_type={prediction_type!r}: null or one of {PREDICTION_TYPES}"
                )
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.prediction_type = self.noise_scheduler.config.prediction_type

        self.adapted = lora_io.add_lora(components, settings)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for name in lora_io.TEXT_ENCODER_NAMES:
                if name in self.adapted:
                    self.adapted[name].gradient_checkpointing_enable()
        # as in training scripts: adapted models in train mode (LoRA dropout), the rest in eval
        for model in (self.vae, *components.text_encoders):
            model.eval()
        for model in self.adapted.values():
            model.train()
        self.frozen_modules = tuple(
            name for name in ("vae", *lora_io.TEXT_ENCODER_NAMES) if name not in self.adapted
        )
        self.metrics = _check_scorer(metrics)
        if isinstance(self.metrics, torch.nn.Module):
            self.metrics.requires_grad_(False)
        self._references: list[Image.Image] = []
        self._collecting: list[Image.Image] = []
        self._val_split_references: list[Image.Image] | None = None
        self._baseline: FidelityValues | None = None
        # validation samples drawn in validation_step, written at the epoch's end; the base
        # model's once per run (on every rank: rank 0 alone knows whether it scored them)
        self._drawn: ValidationDraw | None = None
        self._baseline_drawn = False
        self._warned_no_references = False
        self._warned_class_batch = False

    # ---- properties ----------------------------------------------------------------------
    @property
    def is_sdxl(self) -> bool:
        return self.architecture == "sdxl"

    def lora_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every trainable (LoRA) weight."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    # ---- dtype / device ------------------------------------------------------------------
    def resolved_weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen base (see ``weight_dtype``)."""
        choice = self.hparams.weight_dtype
        trainer = self._trainer
        precision = (
            str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        )
        mixed = precision.endswith("-mixed")
        if choice != "auto":
            dtype = _DTYPES[choice]
            if dtype != torch.float32 and not mixed:
                raise ValueError(
                    f"model.weight_dtype={choice} needs a mixed-precision trainer "
                    f"(trainer.precision=bf16-mixed or 16-mixed), got {precision}"
                )
            return dtype
        device = trainer.strategy.root_device if trainer is not None else self.device
        if device.type != "cuda" or not mixed:
            return torch.float32
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        refuse_under_sharding(
            strategy, self.metrics is not None, "model.metrics=null", SCORER_SEES_A_SHARD
        )
        dtype = self.resolved_weight_dtype()
        if dtype == torch.float32:
            return
        if shards_weights(strategy):
            # FSDP / ZeRO-3 keep the weights sharded in float32 and cast each unit to the
            # compute dtype as they gather it; a bfloat16 base beside float32 LoRA weights
            # could not share one flat parameter
            log.info("sharded strategy: weights stay float32, cast per unit by the strategy")
            return
        self._cast_dtype = dtype
        for model in (self.unet, *self.components.text_encoders):
            model.to(dtype)
        keep_vae_fp32 = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if not keep_vae_fp32:
            self.vae.to(dtype)
        from diffusers.training_utils import cast_training_params

        cast_training_params(list(self.adapted.values()), dtype=torch.float32)
        log.info("frozen base in %s, LoRA weights in float32", dtype)

    def teardown(self, stage: str) -> None:
        """Back to float32 after a run that cast the base (the module leaves the GPU then)."""
        if getattr(self, "_cast_dtype", None) is not None:
            for model in (self.unet, self.vae, *self.components.text_encoders):
                model.to(torch.float32)
            self._cast_dtype = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.resolved_weight_dtype() if self._trainer is not None else torch.float32
        if self.device.type == "cuda" and dtype != torch.float32:
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # ---- conditioning --------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids (B, 77) per tokenizer, padded and truncated like the pipelines do."""
        return [
            tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in self.tokenizers
        ]

    def encode_prompts(
        self,
        prompts: Sequence[str],
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """UNet conditioning: ``encoder_hidden_states`` (+ SDXL's ``added_cond_kwargs``).

        SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
        states concatenated, the second encoder's projected pooled output, and the size/crop
        ids (the target size is ``resolution``; missing sizes default to it, crops to 0).
        """
        ids = self.tokenize(prompts)
        trained = "text_encoder" in self.adapted
        grad = contextlib.nullcontext() if trained else torch.no_grad()
        with grad:
            if not self.is_sdxl:
                encoder = self.text_encoder
                mask = None
                if getattr(encoder.config, "use_attention_mask", False):
                    mask = (ids[0] != self.tokenizers[0].pad_token_id).long().to(self.device)
                hidden = encoder(ids[0].to(self.device), attention_mask=mask)[0]
                return {"encoder_hidden_states": hidden}
            states = []
            pooled = None
            for encoder, input_ids in zip(self.components.text_encoders, ids, strict=True):
                out = encoder(input_ids.to(self.device), output_hidden_states=True)
                pooled = out[0]
                states.append(out.hidden_states[-2])
            hidden = torch.cat(states, dim=-1)
        n, r = len(prompts), self.hparams.resolution
        if original_size is None:
            original_size = torch.tensor([[r, r]] * n)
        if crop_top_left is None:
            crop_top_left = torch.zeros(n, 2, dtype=torch.int64)
        time_ids = sdxl_time_ids(original_size.to(self.device), crop_top_left, (r, r))
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(hidden.dtype)},
        }

    # ---- diffusion loss ------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE latents (sampled from the posterior) x scaling factor, float32."""
        with torch.autocast(self.device.type, enabled=False):
            dist = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
            latents = dist.sample(generator=generator) * self.vae.config.scaling_factor
        return latents.float()

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet regresses: noise (epsilon), velocity (v_prediction) or latents (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights: ones, or min-SNR-gamma with ``snr_gamma``."""
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        from diffusers.training_utils import compute_snr

        return min_snr_weights(
            compute_snr(self.noise_scheduler, timesteps), gamma, self.prediction_type
        )

    def diffusion_loss(
        self,
        pixel_values: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample (weighted) MSE between the UNet output and the target, shape (B,)."""
        latents = self.encode_images(pixel_values, generator)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if self.hparams.noise_offset:
            offset = torch.randn(
                (b, latents.shape[1], 1, 1), generator=generator, device=self.device
            )
            noise = noise + self.hparams.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = self.encode_prompts(prompts, original_size, crop_top_left)
        pred = self.unet(noisy, timesteps, **cond).sample
        target = self.target(latents, noise, timesteps)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return mse * self.loss_weights(timesteps)

    # ---- training ------------------------------------------------------------------------
    def _batch_inputs(self, batch: Mapping[str, Any]) -> tuple[Any, ...]:
        pixels = batch["pixel_values"]
        prompts = list(batch["prompt"])
        sizes, crops = batch.get("original_size"), batch.get("crop_top_left")
        has_class = "class_pixel_values" in batch
        if self.prior["enabled"]:
            if not has_class:
                raise ValueError(
                    "model.prior_preservation.enabled but the batch has no class images: "
                    "set data.class_dir (the same folder as model.prior_preservation.class_dir)"
                )
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += list(batch["class_prompt"])
            if sizes is not None:
                sizes = torch.cat([sizes, batch["class_original_size"]])
                crops = torch.cat([crops, batch["class_crop_top_left"]])
        elif has_class and not self._warned_class_batch:
            self._warned_class_batch = True
            log.warning("the batch has class images but prior preservation is off: ignored")
        return pixels, prompts, sizes, crops

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        num_instance = len(batch["pixel_values"])
        pixels, prompts, sizes, crops = self._batch_inputs(batch)
        generator = _seeded_generator(
            self.device, self.seed, self.global_rank, self.current_epoch, batch_idx
        )
        per_sample = self.diffusion_loss(pixels, prompts, generator, sizes, crops)
        loss, instance, prior = combine_prior_loss(
            per_sample, num_instance, float(self.prior["prior_loss_weight"])
        )
        logs = {"train/loss": loss.detach()}
        if prior is not None:
            logs |= {"train/loss_instance": instance.detach(), "train/loss_prior": prior.detach()}
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=num_instance)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=num_instance)
        return loss

    # ---- validation ----------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        generator = _seeded_generator(
            self.device, int(self.validation["seed"]), 1, self.global_rank, batch_idx
        )
        per_sample = self.diffusion_loss(
            batch["pixel_values"],
            list(batch["prompt"]),
            generator,
            batch.get("original_size"),
            batch.get("crop_top_left"),
        )
        self.log(
            "val/loss",
            per_sample.mean(),
            prog_bar=True,
            batch_size=len(per_sample),
            sync_dist=True,
        )
        if self.metrics is not None and self.trainer.is_global_zero:
            self._collecting.extend(_to_pil(batch["pixel_values"]))
        if batch_idx == 0 and self._samples_due():
            # here, not at the epoch's end: Lightning runs validation_step on every rank with the
            # whole model usable (FSDP / ZeRO-3 gather each unit's weights inside the step), so
            # sharded runs sample too; every rank draws the same samples, rank 0 writes them
            self._drawn = self.draw_validation_samples()

    def _samples_due(self) -> bool:
        trainer = self.trainer
        return not (
            trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)
            or int(self.validation["num_images"]) < 1
        )

    def validation_prompts(self) -> list[str]:
        """``validation.prompts``, else the datamodule's ``sample_prompts``."""
        if self.validation["prompts"]:
            return list(self.validation["prompts"])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        prompts = getattr(datamodule, "sample_prompts", None)
        if not prompts:
            raise ValueError(
                "no validation prompts: set model.validation.prompts (the datamodule has no "
                "sample_prompts)"
            )
        return list(prompts)

    def on_validation_epoch_end(self) -> None:
        collected, self._collecting = self._collecting, []
        if len(collected) != len(self._references):
            self._references = collected  # the same list object across epochs: cached features
        drawn, self._drawn = self._drawn, None
        if drawn is None or not self.trainer.is_global_zero:
            return
        self.write_validation_samples(drawn)

    def reference_images(self) -> list[Image.Image]:
        """The held-out photos that validation samples are scored against.

        The datamodule's whole val split when it has one (read once, at the model's
        resolution with the val centre crop: every photo, also under DDP where this process
        validates only its shard); else the val batches this process saw in the last
        validation. The same list object is returned while it does not change, so a scorer
        may cache its features.
        """
        if self._val_split_references is None:
            self._val_split_references = self._read_val_split() or []
        return self._val_split_references or self._references

    def _read_val_split(self) -> list[Image.Image] | None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        dataset = getattr(datamodule.val_dataloader(), "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            return None
        images = []
        for i in range(len(dataset)):
            item = dataset[i]
            pixels = item.get("pixel_values") if isinstance(item, Mapping) else None
            if not torch.is_tensor(pixels) or pixels.dim() != 3:
                return None
            images += _to_pil(pixels.unsqueeze(0))
        log.info("validation metrics: %d held-out photo(s) as references", len(images))
        return images

    def _validation_samples(self, prompts: Sequence[str]) -> list[Sample]:
        """``validation.num_images`` per prompt; prompt ``i`` from seed ``validation.seed + i``."""
        n = int(self.validation["num_images"])
        pipe = self.pipeline()
        samples: list[Sample] = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(int(self.validation["seed"]) + i)
            images = self.generate([prompt], generator, n, pipe=pipe)
            samples += [Sample(prompt, k, image=img) for k, img in enumerate(images)]
        return samples

    def draw_validation_samples(self) -> ValidationDraw:
        """The validation prompts' samples and, the first time, the base model's samples of the
        same prompts and seeds (for ``validation.baseline`` with a scorer)."""
        prompts = self.validation_prompts()
        samples = self._validation_samples(prompts)
        baseline = None
        if self.validation["baseline"] and self.metrics is not None and not self._baseline_drawn:
            self._baseline_drawn = True
            with self.adapters_disabled():
                baseline = self._validation_samples(prompts)
        return ValidationDraw(prompts, samples, baseline)

    def write_validation_samples(self, drawn: ValidationDraw) -> Path:
        """Sample ``validation_prompts`` with fixed seeds into ``samples/step_XXXXXX/`` and log the grid.

        With ``metrics``, the samples are scored against :meth:`reference_images`: the means
        are logged as ``val/<name>`` and the per-prompt values written to ``metrics.csv`` in
        the same folder. With ``validation.baseline`` the base model (adapters off) is
        sampled and scored once per run, with the same prompts and seeds (its images in
        ``samples/baseline/``, its scores in ``baseline_metrics.json``); its means are
        logged as ``val/baseline_<name>`` at every validation and its per-prompt values fill
        the ``baseline_*`` columns of ``metrics.csv``. ``drawn``: from
        :meth:`draw_validation_samples`. Call on rank 0 only.
        """
        from genlab.loggers.media import log_image
        from genlab.samples import write_samples

        prompts, samples, baseline_samples = drawn
        step = self.global_step
        out = Path(self.trainer.default_root_dir) / "samples" / f"step_{step:06d}"
        _, grid_path = write_samples(samples, out)
        with Image.open(grid_path) as grid:
            log_image(self.trainer.loggers, "val/samples", grid.copy(), step)
        log.info("validation samples of step %d written to %s", step, out)
        if self.metrics is None:
            return out
        references = self.reference_images()
        if not references:
            if not self._warned_no_references:
                self._warned_no_references = True
                log.warning("validation metrics: no val photos to score against; none logged")
            return out
        baseline = None
        if self.validation["baseline"]:
            baseline = self.baseline_scores(prompts, references, baseline_samples)
        scores = self.score(samples, references)
        scalars = {f"val/{k}": v for k, v in scores.means.items()}
        if baseline is not None:
            scalars |= {f"val/baseline_{k}": v for k, v in baseline.means.items()}
        if scalars:
            self.log_dict(scalars, rank_zero_only=True)
        write_fidelity_csv(out / "metrics.csv", scores, baseline)
        return out

    def score(self, samples: Sequence[Sample], references: Sequence[Image.Image]) -> FidelityValues:
        """``metrics`` of ``samples`` (image + prompt) against ``references``."""
        if self.metrics is None:
            raise ValueError("no scorer: set model.metrics (e.g. model/metrics=subject_fidelity)")
        result = self.metrics(
            images=[s.image for s in samples],
            prompts=[s.prompt for s in samples],
            references=references,
        )
        return fidelity_values(result)

    def baseline_scores(
        self,
        prompts: Sequence[str],
        references: Sequence[Image.Image],
        samples: Sequence[Sample] | None,
    ) -> FidelityValues | None:
        """Scores of the base model (adapters off) for ``prompts``: computed from its
        ``samples`` (drawn with the validation seeds) the first time they are given, then
        reused; images and ``baseline_metrics.json`` written into the run directory."""
        if self._baseline is not None or samples is None:
            return self._baseline
        from genlab.loggers.media import log_image
        from genlab.samples import write_samples

        root = Path(self.trainer.default_root_dir)
        _, grid_path = write_samples(samples, root / "samples" / "baseline")
        with Image.open(grid_path) as grid:
            log_image(self.trainer.loggers, "val/baseline_samples", grid.copy(), self.global_step)
        self._baseline = self.score(samples, references)
        write_fidelity_json(
            root / BASELINE_FILE,
            self._baseline,
            extra={
                "model": "base (LoRA adapters disabled)",
                "step": self.global_step,
                "prompts": list(prompts),
                "seed": int(self.validation["seed"]),
                "num_images_per_prompt": int(self.validation["num_images"]),
            },
        )
        log.info(
            "base model without LoRA: %s (%s)",
            ", ".join(f"{k} {v:.4f}" for k, v in self._baseline.means.items()),
            root / BASELINE_FILE,
        )
        return self._baseline

    # ---- sampling ------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """A diffusers pipeline over the live (LoRA-adapted) components."""
        scheduler = None
        if self.sample_scheduler_factory is not None:
            scheduler = self.sample_scheduler_factory(self.noise_scheduler.config)
        return assemble_pipeline(self.components, scheduler)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model, LoRA off, inside the block."""
        lora_io.set_adapters_enabled(self.adapted, False)
        try:
            yield
        finally:
            lora_io.set_adapters_enabled(self.adapted, True)

    @contextlib.contextmanager
    def lora_scaled(self, scale: float) -> Iterator[None]:
        """Inside the block every LoRA update is multiplied by ``scale`` (0: the base model's
        outputs, 1: as trained); the trained scale alpha/rank is restored afterwards."""
        from peft.tuners.lora import LoraLayer

        layers = [
            m for part in self.adapted.values() for m in part.modules() if isinstance(m, LoraLayer)
        ]
        for layer in layers:
            layer.set_scale(lora_io.ADAPTER, float(scale))
        try:
            yield
        finally:
            for layer in layers:
                layer.set_scale(lora_io.ADAPTER, 1.0)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_per_prompt: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        pipe: Any = None,
        negative_prompt: str | None = _UNSET,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image.Image]:
        """Images for ``prompts`` (prompt-major), in eval mode.

        ``steps``, ``guidance`` and ``negative_prompt`` default to the ``validation`` ones,
        ``height``/``width`` to ``resolution``; ``pipe`` (e.g. with another scheduler) to
        :meth:`pipeline`.
        """
        pipe = pipe or self.pipeline()
        if negative_prompt is _UNSET:
            negative_prompt = self.validation["negative_prompt"]
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with self._autocast():
                out = pipe(
                    list(prompts),
                    num_images_per_prompt=num_per_prompt,
                    generator=generator,
                    num_inference_steps=int(steps or self.validation["steps"]),
                    guidance_scale=float(
                        self.validation["guidance"] if guidance is None else guidance
                    ),
                    negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                    height=int(height or self.hparams.resolution),
                    width=int(width or self.hparams.resolution),
                )
            return list(out.images)
        finally:
            for m, mode in modes.items():
                m.training = mode

    def sample(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Sample]:
        """``num_per_prompt`` images per prompt (validation steps and guidance)."""
        pipe = self.pipeline()
        samples = []
        for prompt in prompts:
            images = self.generate([prompt], generator, num_per_prompt, pipe=pipe)
            samples += [Sample(prompt, i, image=img) for i, img in enumerate(images)]
        return samples

    # ---- prior preservation: class images ------------------------------------------------
    def prepare_data(self) -> None:
        """Fill ``prior_preservation.class_dir`` up to ``num_class_images`` (base model, LoRA off)."""
        if self.prior["enabled"]:
            self.generate_class_images()

    def generate_class_images(self) -> int:
        """Sample the missing class images for ``class_prompt`` and write them as PNGs.

        Image ``k`` is ``class_{k:05d}.png`` from seed ``prior_preservation.seed + k``, written
        atomically; images already there (any name) count, so a second call generates
        nothing. Returns how many were written.
        """
        from tqdm.auto import tqdm

        folder = Path(str(self.prior["class_dir"])).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        existing = [
            p
            for p in folder.iterdir()
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        ]
        missing = int(self.prior["num_class_images"]) - len(existing)
        if missing <= 0:
            log.info("class images: %d in %s, none to generate", len(existing), folder)
            return 0
        names = {p.name for p in existing}
        indices: list[int] = []
        k = 0
        while len(indices) < missing:
            if f"class_{k:05d}.png" not in names:
                indices.append(k)
            k += 1
        if self._trainer is not None:
            self.to(self._trainer.strategy.root_device)
        prompt = str(self.prior["class_prompt"])
        batch = max(1, int(self.prior["sample_batch_size"]))
        log.info("generating %d class images for %r into %s", missing, prompt, folder)
        pipe = self.pipeline()
        written = 0
        with self.adapters_disabled(), tqdm(total=missing, desc="class images") as bar:
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                generators = [
                    torch.Generator().manual_seed(int(self.prior["seed"]) + i) for i in chunk
                ]
                images = self.generate(
                    [prompt] * len(chunk),
                    generators,
                    steps=int(self.prior["steps"]),
                    guidance=float(self.prior["guidance"]),
                    pipe=pipe,
                )
                for i, image in zip(chunk, images, strict=True):
                    _save_png_atomic(image, folder / f"class_{i:05d}.png")
                    written += 1
                bar.update(len(chunk))
        return written

    # ---- optimisers ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for _, p in self.lora_parameters()]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {"optimizer": optimizer}
        func = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        given = getattr(self.scheduler_factory, "keywords", {}) or {}
        try:
            takes_total = "num_training_steps" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            takes_total = False
        if takes_total and given.get("num_training_steps") is None and self._trainer is not None:
            total = self._trainer.estimated_stepping_batches
            if math.isfinite(total):
                kwargs["num_training_steps"] = int(total)
        scheduler = self.scheduler_factory(**kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ---- checkpoints: LoRA weights only --------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {plain_name(n) for n, _ in self.lora_parameters()}

    def saved_keys(self) -> Callable[[str], bool]:
        """Only the LoRA weights (the frozen base is rebuilt from the config)."""
        return self._trainable_keys().__contains__

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        """Load LoRA weights: genlab's own keys, or a diffusers/kohya LoRA state dict."""
        if lora_io.is_lora_file_state(state_dict):
            lora_io.load_lora_into(state_dict, self.components, self.adapted, self.lora_settings)
            return torch.nn.modules.module._IncompatibleKeys([], [])
        frozen, keys = load_partial_state(
            self,
            state_dict,
            self._trainable_keys(),
            strict,
            assign,
            f"LoRA state dict does not match this model ({self.architecture}, rank "
            f"{self.lora_settings.rank}, targets {self.lora_settings.target_modules})",
        )
        if frozen:
            log.warning("%d frozen base weight(s) in the state dict were loaded too", len(frozen))
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lora_sd"] = {
            "seed": self.seed,
            "architecture": self.architecture,
            "rank": int(self.lora_settings.rank),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("lora_sd") or {}
        if info.get("architecture") not in (None, self.architecture):
            raise ValueError(
                f"checkpoint is a {info['architecture']} LoRA, this model is {self.architecture}"
            )
        if "seed" in info:
            self.seed = int(info["seed"])

    # ---- export --------------------------------------------------------------------------
    def export_weights(self, path: str | Path) -> Path:
        """``path`` (genlab's LoRA-only safetensors) and, beside it, the ``export_format`` files:
        ``pytorch_lora_weights.safetensors`` (diffusers) and/or ``lora_kohya.safetensors``."""
        path = super().export_weights(path)
        self.export_lora(path.parent)
        return path

    def export_lora(self, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        written = []
        if "diffusers" in self.hparams.export_format:
            written.append(
                lora_io.save_diffusers_lora(
                    folder, self.components, self.adapted, self.lora_settings
                )
            )
        if "kohya" in self.hparams.export_format:
            written.append(
                lora_io.save_kohya_lora(
                    folder / lora_io.KOHYA_WEIGHT_NAME, self.adapted, self.lora_settings
                )
            )
        for p in written:
            log.info("LoRA weights written to %s", p)
        return written

    def load_lora_weights(self, source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Copy LoRA weights from a diffusers/kohya file (or folder) into this model's adapters."""
        return lora_io.load_lora_into(source, self.components, self.adapted, self.lora_settings)


def _check_scorer(metrics: Any) -> Callable[..., Any] | None:
    """``model.metrics`` as built by Hydra: a scorer, None, or a config left without a scorer.

    A recipe wires ``model.metrics.identifier`` from the data; with the scorer group removed
    on top (``~model/metrics``), only that key remains: no scorer, as asked.
    """
    if metrics is None or callable(metrics):
        return metrics
    if isinstance(metrics, Mapping):
        keys = sorted(str(k) for k in metrics)
        if set(keys) <= {"identifier", "batch_size"}:
            log.info("model.metrics holds only %s and no scorer: no validation metrics", keys)
            return None
        raise ValueError(
            f"model.metrics is a config without _target_ (keys {keys}): choose a scorer with "
            "model/metrics=subject_fidelity (or subject_fidelity_tiny), or none with ~model/metrics"
        )
    raise TypeError(f"model.metrics must be callable or null, got {type(metrics).__name__}")


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "LoRADreamBooth",
    "adamw_8bit",
    "combine_prior_loss",
    "min_snr_weights",
    "sdxl_time_ids",
]

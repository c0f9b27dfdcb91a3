"""Fine-tuning of a Shap-E latent diffusion prior (text300M or image300M) as a LightningModule.

One step (maths in :mod:`genlab.models.shape_e.prior_training`): take the batch's precomputed
latents ``(B, E, D)``, encode the captions (CLIP text, as ``ShapEPipeline``) or a rendered view
(CLIP vision tokens, as ``ShapEImg2ImgPipeline``), replace each condition by zeros with
probability ``cond_dropout`` (classifier-free guidance), noise the latents at a training
timestep of the scheduler's schedule, and regress the scheduler's target (the clean latent for
the released ``prediction_type="sample"``) with the first ``D`` of the prior's ``2 D`` output
channels. A non-finite loss skips the step (no backward, no optimiser update), with a warning
and the ``train/skipped_steps`` counter; under DDP all ranks skip that step together.

Full fine-tuning (``trainable`` / ``frozen`` choose the parts) or LoRA on the attention
projections (peft), optional EMA of the trained weights, gradient checkpointing of the
transformer blocks; bf16 through ``trainer.precision=bf16-mixed``.

Validation (on the datamodule's val split, never the training batch): ``val/loss`` on the
val latents, then, for up to ``validation.num_objects`` val objects, latents sampled with
guidance from their captions / images, decoded to meshes and turntable renders
(:mod:`genlab.models.shape_e.decode`), written to ``samples/step_XXXXXX/`` (mesh, GIF, render
grid) and logged; metrics: CLIP score and CLIP R-precision of the renders against the captions,
Chamfer distance and F-score of the decoded meshes against the objects' points.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genlab.distributed import (
    EMA_SEES_A_SHARD,
    SCORER_SEES_A_SHARD,
    call_with_full_weights,
    refuse_under_sharding,
    shards_weights,
)
from genlab.models.base import GenerativeModule, load_partial_state
from genlab.models.shape_e.components import ShapEComponents
from genlab.models.shape_e.prior_adapters import (
    LORA_WEIGHT_NAME,
    LoRASettings,
    TrainableEMA,
    add_prior_lora,
    enable_block_checkpointing,
    load_prior_lora,
    save_prior_lora,
    select_trainable,
)
from genlab.models.shape_e.prior_training import (
    PREDICTION_TYPES,
    TIMESTEP_SAMPLING,
    SigmaSchedule,
    diffusion_training_target,
    drop_condition,
    image_condition,
    images_to_pixels,
    prior_loss,
    sample_latents,
    sample_timesteps,
    text_condition,
)
from genlab.samples import Sample

log = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "lora")
ENCODE_HINT = (
    "compute them first: python -m genlab.models.shape_e.encode root=<data root> "
    "(or dvc repro encode)"
)
_VALIDATION_DEFAULTS: dict[str, Any] = {
    "num_objects": 4,
    "num_per_condition": 1,
    "guidance_scale": 15.0,
    "steps": 64,
    "frame_size": 64,
    "num_views": 8,
    "elevation": 30.0,
    "grid_size": 64,
    "level": 0.0,
    "seed": 0,
    "metric_points": 2048,
    "fscore_threshold": 0.01,
    "mesh_format": "obj",
}
_EMA_DEFAULTS: dict[str, Any] = {"enabled": False, "decay": 0.999, "use_for_sampling": True}


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def _options(name: str, given: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    given = _plain(given) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"model.{name}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def load_scheduler_config(path: str | Path) -> dict[str, Any]:
    """A diffusers scheduler config from a ``.json`` or ``.yaml`` file (``diffusion_config``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.diffusion_config={path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
        else:
            config = json.loads(text)
    except Exception as err:
        raise ValueError(f"{path}: not a readable scheduler config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a scheduler config must be a mapping, got {type(config)}")
    return config


def build_scheduler(config: Mapping[str, Any], base: Any) -> Any:
    """``HeunDiscreteScheduler`` (the Shap-E sampler) from ``base``'s config updated by ``config``."""
    from diffusers import HeunDiscreteScheduler

    merged = {**dict(base.config), **{k: v for k, v in config.items() if not k.startswith("_")}}
    return HeunDiscreteScheduler.from_config(merged)


def _seeded_generator(device: torch.device, *entropy: int) -> torch.Generator:
    """A generator seeded by a mix of ``entropy`` (seed, rank, epoch, batch): the same numbers
    for the same step, also after a resume (splitmix64 mixing; cheap enough for every step)."""
    state = 0x9E3779B97F4A7C15
    for value in entropy:
        state = (
            state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)
        ) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return torch.Generator(device=device).manual_seed(state & 0x7FFFFFFFFFFFFFFF)


@dataclass
class _ValObjects:
    """Up to ``num_objects`` val objects collected during the validation loop."""

    object_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.object_ids)


@dataclass
class Generated:
    """Latents sampled for some conditions, decoded."""

    latents: torch.Tensor  # (B, E, D)
    meshes: list[Any]  # trimesh.Trimesh | None
    frames: np.ndarray  # uint8 (B, V, H, W, 3)
    labels: list[str]


class ShapEPriorFineTune(GenerativeModule):
    """Fine-tune a Shap-E prior on precomputed latents (see the module docstring).

    Args:
        components: :class:`~genlab.models.shape_e.components.ShapEComponents` (built by
            Hydra: ``pretrained_components`` or ``tiny_components``).
        optimizer: ``_partial_`` optimiser, given the trainable parameters.
        conditioning: ``text`` (captions, text300M) or ``image`` (a rendered view, image300M);
            must match the components.
        finetune: ``full`` or ``lora`` (peft adapters on ``lora.target_modules``).
        lora: rank, alpha, dropout, target_modules, init.
        trainable: prior parts (name prefixes) to train; null = the whole prior (full) or
            none besides the adapters (lora).
        frozen: prior parts (name prefixes) kept frozen (applied after ``trainable``).
        lr_scheduler: optional ``_partial_`` LR scheduler, stepped every optimiser step.
        diffusion_config: path of a scheduler config (JSON/YAML) overriding the components'
            scheduler (a ``HeunDiscreteScheduler``), for training and sampling.
        timestep_sampling: ``discrete`` (integer training steps) or ``continuous``.
        snr_gamma: min-SNR-gamma loss weighting; null = plain MSE.
        cond_dropout: probability of the unconditional (zero) condition per sample.
        ema: enabled, decay, use_for_sampling (validation, sampling and exported weights).
        gradient_checkpointing: recompute the prior's transformer blocks in backward.
        validation: num_objects, num_per_condition, guidance_scale, steps, frame_size,
            num_views, elevation, grid_size, level, seed, metric_points, fscore_threshold,
            mesh_format.
        clip_scorer: a :class:`~genlab.metrics.image_similarity.ClipImageTextScorer` for CLIP
            score / R-precision, or None.
        export_diffusers_prior: with ``finetune=full``, also write the prior as a diffusers
            folder ``prior/`` beside the exported weights.
        seed: seed of the noise streams (null: ``torch.initial_seed()``).
        pretrained: the released weights the components were loaded from (the config passes it
            to the components builder; recorded here).
        data: what this model asks of the objaverse data (``mode``, ``load``, ``batch_size``);
            read by ``conf/data/objaverse.yaml`` through ``oc.select``, recorded here only.
    """

    def __init__(
        self,
        components: ShapEComponents,
        optimizer: Callable[..., torch.optim.Optimizer],
        conditioning: str = "text",
        finetune: str = "full",
        lora: Mapping[str, Any] | None = None,
        trainable: Sequence[str] | None = None,
        frozen: Sequence[str] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        diffusion_config: str | None = None,
        timestep_sampling: str = "discrete",
        snr_gamma: float | None = None,
        cond_dropout: float = 0.1,
        ema: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        validation: Mapping[str, Any] | None = None,
        clip_scorer: Any = None,
        export_diffusers_prior: bool = True,
        seed: int | None = None,
        pretrained: str | None = None,
        data: Mapping[str, Any] | None = None,
        main_metric: str = "val/loss",
        main_metric_mode: str = "min",
    ) -> None:
        super().__init__()
        if not isinstance(components, ShapEComponents):
            raise TypeError(
                f"model.components must build ShapEComponents, got {type(components).__name__}"
            )
        if conditioning not in ("text", "image"):
            raise ValueError(f"model.conditioning={conditioning!r}: text or image")
        if components.conditioning != conditioning:
            raise ValueError(
                f"model.conditioning={conditioning} but the components are for "
                f"{components.conditioning} conditioning (set model.components.conditioning)"
            )
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"model.finetune={finetune!r}: one of {FINETUNE_MODES}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"model.timestep_sampling={timestep_sampling!r}: one of {TIMESTEP_SAMPLING}"
            )
        if not 0.0 <= float(cond_dropout) <= 1.0:
            raise ValueError(f"model.cond_dropout must be in [0, 1], got {cond_dropout}")
        val = _options("validation", validation, _VALIDATION_DEFAULTS)
        ema_opts = _options("ema", ema, _EMA_DEFAULTS)
        lora_settings = LoRASettings.from_mapping(_plain(lora))
        trainable = None if trainable is None else [str(t) for t in _plain(trainable)]
        frozen = [str(f) for f in _plain(frozen) or []]
        self.save_hyperparameters(
            {
                "components_source": components.source,
                "pretrained": None if pretrained is None else str(pretrained),
                "conditioning": conditioning,
                "finetune": finetune,
                "lora": {k: _plain(v) for k, v in vars(lora_settings).items()},
                "trainable": trainable,
                "frozen": frozen,
                "diffusion_config": diffusion_config,
                "timestep_sampling": timestep_sampling,
                "snr_gamma": snr_gamma,
                "cond_dropout": float(cond_dropout),
                "ema": ema_opts,
                "gradient_checkpointing": bool(gradient_checkpointing),
                "validation": val,
                "export_diffusers_prior": bool(export_diffusers_prior),
                "data": _plain(data),
                "main_metric": main_metric,
                "main_metric_mode": main_metric_mode,
            }
        )
        self.components = components
        self.conditioning = conditioning
        self.validation = val
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.main_metric = main_metric
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.lora_settings = lora_settings
        self.cond_dropout = float(cond_dropout)
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.timestep_sampling = timestep_sampling

        if diffusion_config:
            components.scheduler = build_scheduler(
                load_scheduler_config(diffusion_config), components.scheduler
            )
            log.info("scheduler from %s: %s", diffusion_config, dict(components.scheduler.config))
        self.scheduler = components.scheduler
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {self.prediction_type!r}: one of {PREDICTION_TYPES}"
            )
        self.schedule = SigmaSchedule(self.scheduler)

        self.prior = components.prior
        self.renderer = components.renderer
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.image_encoder = components.image_encoder
        self.image_processor = components.image_processor
        for part in (self.renderer, self.text_encoder, self.image_encoder):
            if part is not None:
                part.requires_grad_(False).eval()

        if finetune == "lora":
            names = add_prior_lora(self.prior, lora_settings)
            if trainable:
                extra = select_trainable(self.prior, trainable, frozen)
                names = sorted(set(names) | set(extra))
                for name, param in self.prior.named_parameters():
                    param.requires_grad_(name in names)
        else:
            names = select_trainable(self.prior, trainable, frozen)
        if not names:
            raise ValueError("nothing to train: model.trainable / model.frozen leave no parameter")
        self.trainable_names = names
        # trained weights in float32 (also when the parts were loaded in half precision:
        # bf16 / fp16 compute comes from trainer.precision's autocast)
        upcast = [p for _, p in self.trainable_parameters() if p.dtype != torch.float32]
        for param in upcast:
            param.data = param.data.float()
        if upcast:
            log.info("%d trained tensors cast to float32", len(upcast))
        if gradient_checkpointing:
            enable_block_checkpointing(self.prior)
        self.prior.train()

        self.ema = (
            TrainableEMA(self.prior, float(ema_opts["decay"])) if ema_opts["enabled"] else None
        )
        self.clip_scorer = clip_scorer
        if isinstance(clip_scorer, torch.nn.Module):
            clip_scorer.requires_grad_(False)
        self.frozen_modules = ("renderer", "text_encoder", "image_encoder", "clip_scorer")
        self.skipped_steps = 0
        self._range_checked = False
        self._step_skipped = False
        self._ema_step = -1
        self._val = _ValObjects()
        self._last_val = _ValObjects()

    # ---- parameters ----------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every trained weight (names within the prior)."""
        return ((n, p) for n, p in self.prior.named_parameters() if p.requires_grad)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.components.latent_shape

    # ---- data checks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fail before training when the data has no latents, or latents of another shape, or
        when the CLIP scorer or the EMA would see only shards of the weights."""
        strategy = getattr(self._trainer, "strategy", None)
        used = self.clip_scorer is not None
        refuse_under_sharding(strategy, used, "model.clip_scorer=null", SCORER_SEES_A_SHARD)
        used = self.ema is not None
        refuse_under_sharding(strategy, used, "model.ema.enabled=false", EMA_SEES_A_SHARD)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        root = getattr(datamodule, "root", None)
        if datamodule is None or root is None:
            return
        if "latent" not in tuple(getattr(datamodule, "load", ())):
            raise ValueError(
                f"the Shap-E prior trains on latents, but the data loads "
                f"{list(getattr(datamodule, 'load', ()))}: add latent to data.load"
            )
        if not (Path(root) / "latents").is_dir():
            raise FileNotFoundError(f"{Path(root) / 'latents'}: no latents; {ENCODE_HINT}")
        if self.conditioning == "image" and "image" not in datamodule.load:
            raise ValueError("image conditioning needs the renders: add image to data.load")
        first = next(
            (o.latent for part in getattr(datamodule, "splits", {}).values() for o in part), None
        )
        if first is not None:
            from genlab.data.objaverse import read_latent

            self._check_range(self.components.check_latents(read_latent(first), str(first)), first)

    def _check_range(self, latents: torch.Tensor, where: Any) -> None:
        """Warn (once) about latents the sampler cannot produce: with ``clip_sample`` it clips
        every predicted latent to ``[-clip_sample_range, clip_sample_range]``."""
        config = self.scheduler.config
        if self._range_checked or not config.get("clip_sample", False):
            return
        self._range_checked = True
        bound = float(config.get("clip_sample_range", 1.0))
        peak = float(latents.detach().abs().max())
        if peak > bound:
            log.warning(
                "%s: latent values up to %.3g, outside [-%g, %g] to which the sampler clips its "
                "predictions (scheduler clip_sample): such latents cannot be generated; were they "
                "made by the matching encoder?",
                where,
                peak,
                bound,
                bound,
            )

    def _batch_latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "latent" not in batch:
            raise KeyError(f"the batch has no 'latent' (keys {sorted(batch)}); {ENCODE_HINT}")
        latents = batch["latent"]
        ids = list(batch.get("object_id", []))
        where = f"latents of objects {ids[:4]}{' ...' if len(ids) > 4 else ''}"
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if getattr(datamodule, "root", None) is not None and ids:
            where = f"{Path(datamodule.root) / 'latents' / ids[0]}.* (batch of {ids[:4]})"
        latents = self.components.check_latents(latents, where)
        self._check_range(latents, where)
        if latents.ndim == 2:
            latents = latents.unsqueeze(0)
        return latents.float()

    # ---- conditioning --------------------------------------------------------------------
    def encode_condition(
        self, captions: Sequence[str] | None = None, images: Any = None
    ) -> torch.Tensor:
        """The prior's ``proj_embedding`` for captions (text) or images (image), no grad."""
        if self.conditioning == "text":
            if captions is None:
                raise ValueError("text conditioning needs captions")
            return text_condition(self.text_encoder, self.tokenizer, list(captions), self.device)
        if images is None:
            raise ValueError(
                "image conditioning needs images: the batch has no 'image' (add image to "
                "data.load, or data.mode=image)"
            )
        pixels = images_to_pixels(self.image_processor, images)
        return image_condition(self.image_encoder, pixels, self.device)

    def _batch_condition(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.conditioning == "text":
            return self.encode_condition(captions=list(batch["caption"]))
        return self.encode_condition(images=batch.get("image"))

    # ---- training ------------------------------------------------------------------------
    def diffusion_loss(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        generator: torch.Generator,
        cond_dropout: float,
    ) -> torch.Tensor:
        """The prior's loss on ``latents (B, E, D)`` for ``condition`` (see module docstring)."""
        condition, _ = drop_condition(condition, cond_dropout, generator)
        timesteps = sample_timesteps(
            latents.shape[0], self.schedule, generator, self.timestep_sampling, latents.device
        )
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        noised = diffusion_training_target(
            latents, noise.to(latents), timesteps, self.schedule, self.prediction_type
        )
        output = self.prior(
            noised.model_input, timestep=noised.timesteps, proj_embedding=condition.to(latents)
        ).predicted_image_embedding
        return prior_loss(
            output, noised.target, noised.sigmas, self.snr_gamma, self.prediction_type
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        latents = self._batch_latents(batch)
        condition = self._batch_condition(batch)
        generator = _seeded_generator(
            self.device, self.seed, self.global_rank, self.current_epoch, batch_idx
        )
        loss = self.diffusion_loss(latents, condition, generator, self.cond_dropout)
        finite = bool(torch.isfinite(loss))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # every rank skips when one has a non-finite loss (DDP needs the same backward)
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._step_skipped = not finite
        if self._step_skipped:
            self.skipped_steps += 1
            ids = list(batch.get("object_id", []))
            log.warning(
                "non-finite loss (%s) at step %d (objects %s): step skipped, weights unchanged "
                "(%d skipped so far)",
                float(loss.detach()),
                self.global_step,
                ids[:8],
                self.skipped_steps,
            )
        if self._step_skipped or self._logging_step():
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=len(latents))
        if self._step_skipped:
            return None
        if self._logging_step():
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(latents))
        return loss

    def _logging_step(self) -> bool:
        """Whether this step's values reach the loggers (every ``log_every_n_steps``): logging
        costs about a millisecond per value, as much as a tiny model's whole step."""
        trainer = self._trainer
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) if trainer else 1
        return (self.global_step + 1) % every == 0 or self.global_step == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and not self._step_skipped and self.global_step != self._ema_step:
            self.ema.update(self.prior)
            self._ema_step = self.global_step

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """The EMA weights inside the block (when EMA is on and used for sampling)."""
        if self.ema is None or not self.hparams.ema["use_for_sampling"]:
            yield
            return
        with self.ema.swapped(self.prior):
            yield

    # ---- validation ----------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        latents = self._batch_latents(batch)
        condition = self._batch_condition(batch)
        generator = _seeded_generator(
            self.device, int(self.validation["seed"]), 1, self.global_rank, batch_idx
        )
        with self.sampling_weights():
            loss = self.diffusion_loss(latents, condition, generator, 0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(latents), sync_dist=True)
        self._collect(batch)

    def _collect(self, batch: Mapping[str, Any]) -> None:
        room = int(self.validation["num_objects"]) - len(self._val)
        ids = list(batch.get("object_id", []))[: max(room, 0)]
        for i, object_id in enumerate(ids):
            self._val.object_ids.append(str(object_id))
            self._val.captions.append(str(batch["caption"][i]) if "caption" in batch else "")
            if "image" in batch:
                self._val.images.append(batch["image"][i].detach().float().cpu())
            points = batch.get("points")
            # float32 whatever the step's input dtype (FSDP's mixed precision casts the batch)
            self._val.points.append(None if points is None else points[i].detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        collected, self._val = self._val, _ValObjects()
        trainer = self.trainer
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        if shards_weights(trainer.strategy):
            # every rank samples rank 0's objects together, gathering the weights it holds a
            # shard of; rank 0 writes
            collected = trainer.strategy.broadcast(collected, src=0)
        elif not trainer.is_global_zero:
            return
        if not len(collected):
            return
        self._last_val = collected
        generated = call_with_full_weights(trainer, self, "generate_validation", collected)
        if not trainer.is_global_zero:
            return
        metrics = self.write_validation(collected, generated)
        if metrics:
            self.log_dict(metrics, rank_zero_only=True)

    # ---- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        labels: Sequence[str],
        generator: torch.Generator | None = None,
        num_per_condition: int = 1,
        guidance_scale: float | None = None,
        steps: int | None = None,
        frame_size: int | None = None,
        num_views: int | None = None,
    ) -> Generated:
        """Sample latents for ``condition`` (``num_per_condition`` each, condition-major),
        decode them to meshes and turntable frames. Options default to ``validation``."""
        from genlab.models.shape_e.decode import decode_meshes, render_views

        val = self.validation
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with self.sampling_weights():
                latents = sample_latents(
                    self.prior,
                    self.scheduler,
                    condition.to(self.device),
                    float(val["guidance_scale"] if guidance_scale is None else guidance_scale),
                    int(steps or val["steps"]),
                    generator,
                    num_per_condition=num_per_condition,
                )
        finally:
            for m, mode in modes.items():
                m.training = mode
        latents = latents.float()
        meshes = decode_meshes(
            self.renderer, latents, grid_size=int(val["grid_size"]), level=float(val["level"])
        )
        frames = render_views(
            self.renderer,
            latents,
            size=int(frame_size or val["frame_size"]),
            num_views=int(num_views or val["num_views"]),
            elevation=float(val["elevation"]),
            meshes=meshes,
        )
        labels = [str(lab) for lab in labels for _ in range(num_per_condition)]
        return Generated(latents, meshes, frames, labels)

    def sample(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Sample]:
        """Meshes (and their first render) for ``prompts``: captions (text), or image files
        (image; a prompt that is no file uses the last validation's image of that caption,
        else the unconditional model, with a warning)."""
        condition = self._prompt_condition(list(prompts))
        generated = self.generate(condition, prompts, generator, num_per_prompt)
        samples = []
        for k, (mesh, label) in enumerate(zip(generated.meshes, generated.labels, strict=True)):
            image = Image.fromarray(generated.frames[k, 0])
            samples.append(Sample(label, k % num_per_prompt, mesh=mesh, image=image))
        return samples

    def _prompt_condition(self, prompts: list[str]) -> torch.Tensor:
        if self.conditioning == "text":
            return self.encode_condition(captions=prompts)
        from genlab.data.images import read_image

        rows = []
        for prompt in prompts:
            if Path(prompt).expanduser().is_file():
                image = read_image(Path(prompt).expanduser(), "RGB", (255, 255, 255))
                rows.append(self.encode_condition(images=[image]))
            elif prompt in self._last_val.captions and self._last_val.images:
                index = self._last_val.captions.index(prompt)
                rows.append(self.encode_condition(images=self._last_val.images[index][None]))
            else:
                log.warning("no image for %r: sampled without a condition", prompt)
                reference = rows[0] if rows else self._image_condition_shape()
                rows.append(torch.zeros_like(reference))
        return torch.cat(rows)

    def _image_condition_shape(self) -> torch.Tensor:
        size = int(self.image_processor.crop_size["height"])
        blank = torch.ones(1, 3, size, size)
        return self.encode_condition(images=blank)

    # ---- validation outputs --------------------------------------------------------------
    def generate_validation(self, objects: _ValObjects) -> Generated:
        """The val objects' generations: ``validation.num_per_condition`` each, from the
        validation seed, conditioned on their captions (text) or renders (image)."""
        val = self.validation
        if self.conditioning == "text":
            condition = self.encode_condition(captions=objects.captions)
        else:
            condition = self.encode_condition(images=torch.stack(objects.images))
        generator = torch.Generator(device=self.device).manual_seed(int(val["seed"]))
        labels = [c or i for c, i in zip(objects.captions, objects.object_ids, strict=True)]
        return self.generate(condition, labels, generator, int(val["num_per_condition"]))

    def write_validation(self, objects: _ValObjects, generated: Generated) -> dict[str, float]:
        """Write and log the val objects' generations (:meth:`generate_validation`); return the
        metrics."""
        from genlab.geometry.mesh_io import save_mesh
        from genlab.geometry.render import image_grid
        from genlab.loggers.media import log_image
        from genlab.models.shape_e.decode import write_turntable_gif

        val = self.validation
        per = int(val["num_per_condition"])
        step = self.global_step
        out = Path(self.trainer.default_root_dir) / "samples" / f"step_{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        tiles = []
        for k, mesh in enumerate(generated.meshes):
            stem = Sample(generated.labels[k], k % per).stem
            if mesh is not None:
                save_mesh(mesh, out / f"{stem}.{str(val['mesh_format']).lstrip('.')}")
            gif = write_turntable_gif(generated.frames[k], out / f"{stem}.gif")
            _log_file(self.trainer.loggers, f"val/turntable/{stem}", gif, step)
            tiles += [Image.fromarray(f) for f in generated.frames[k]]
        views = generated.frames.shape[1]
        grid = image_grid(tiles, ncols=views)
        grid.save(out / "renders.png")
        log_image(self.trainer.loggers, "val/renders", grid, step)
        log.info("validation samples of step %d written to %s", step, out)
        metrics = self.score(generated, objects, per)
        if metrics:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return metrics

    def score(self, generated: Generated, objects: _ValObjects, per: int) -> dict[str, float]:
        """CLIP score / R-precision of the renders, Chamfer / F-score of the meshes (NaN-free:
        empty meshes are counted in ``val/empty_meshes`` and left out of the geometry)."""
        metrics: dict[str, float] = {}
        captions = [c for c in objects.captions for _ in range(per)]
        if self.clip_scorer is not None and all(captions):
            metrics |= clip_metrics(self.clip_scorer, generated.frames, captions)
        points = [p for p in objects.points for _ in range(per)]
        empty = sum(m is None for m in generated.meshes)
        metrics["val/empty_meshes"] = float(empty)
        if empty:
            log.warning(
                "validation: %d of %d decoded meshes are empty (no surface at level %s); "
                "left out of Chamfer / F-score",
                empty,
                len(generated.meshes),
                self.validation["level"],
            )
        pairs = [(m, p) for m, p in zip(generated.meshes, points, strict=True) if m is not None]
        pairs = [(m, p) for m, p in pairs if p is not None]
        if pairs:
            metrics |= geometry_metrics(
                pairs,
                int(self.validation["metric_points"]),
                float(self.validation["fscore_threshold"]),
                int(self.validation["seed"]),
            )
        return metrics

    # ---- optimisers ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for _, p in self.trainable_parameters()]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ---- checkpoints ---------------------------------------------------------------------
    def _saved_prefixes(self) -> tuple[set[str], tuple[str, ...]]:
        """(exact keys, prefixes) of what checkpoints hold: the prior's trained weights (all of
        them, or its LoRA adapters) and the EMA shadows. Its frozen constants (``clip_mean``,
        ``clip_std``) come from the pretrained prior."""
        return {f"prior.{n}" for n in self.trainable_names}, ("ema.",)

    def saved_keys(self) -> Callable[[str], bool]:
        keys, prefixes = self._saved_prefixes()
        return lambda key: key in keys or key.startswith(prefixes)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        _, keys = load_partial_state(
            self,
            state_dict,
            set(self.state_dict()),
            strict,
            assign,
            f"checkpoint does not fit this Shap-E prior ({self.hparams.finetune}, "
            f"latent {self.latent_shape})",
        )
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["shape_e"] = {
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "latent_shape": list(self.latent_shape),
            "finetune": self.hparams.finetune,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("shape_e") or {}
        if info.get("latent_shape") not in (None, list(self.latent_shape)):
            raise ValueError(
                f"checkpoint is for latents {info['latent_shape']}, this model makes "
                f"{list(self.latent_shape)}"
            )
        self.seed = int(info.get("seed", self.seed))
        self.skipped_steps = int(info.get("skipped_steps", 0))

    # ---- export --------------------------------------------------------------------------
    def export_weights(self, path: str | Path) -> Path:
        """``path`` (the checkpoint's weights as safetensors) and, beside it, with the EMA
        weights when EMA is used for sampling: ``prior_lora.safetensors`` (LoRA) or the
        diffusers folder ``prior/`` (full, ``export_diffusers_prior``)."""
        path = super().export_weights(path)
        with self.sampling_weights():
            if self.hparams.finetune == "lora":
                written = save_prior_lora(
                    self.prior, path.parent / LORA_WEIGHT_NAME, self.lora_settings
                )
                log.info("LoRA weights of the prior written to %s", written)
            elif self.hparams.export_diffusers_prior:
                self.prior.save_pretrained(path.parent / "prior", safe_serialization=True)
                log.info("fine-tuned prior written to %s (diffusers folder)", path.parent / "prior")
        return path

    def load_lora_weights(self, path: str | Path) -> int:
        """Copy a ``prior_lora.safetensors`` into this model's adapters (``finetune=lora``)."""
        if self.hparams.finetune != "lora":
            raise ValueError("load_lora_weights needs model.finetune=lora")
        return load_prior_lora(self.prior, path)


# ---------------------------------------------------------------------------------- metrics


def clip_metrics(scorer: Any, frames: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """CLIP score (mean cosine of every render view with its caption) and CLIP R-precision
    (share of samples whose caption ranks first among the distinct captions, by the mean
    view feature). R-precision needs at least two distinct captions."""
    count, views = frames.shape[:2]
    images = [Image.fromarray(f) for sample in frames for f in sample]
    image_features = scorer.image_features(images).float().reshape(count, views, -1)
    distinct = sorted(set(captions))
    text_features = scorer.text_features(distinct).float()
    own = torch.tensor([distinct.index(c) for c in captions])
    per_view = torch.einsum("bvd,bd->bv", image_features, text_features[own])
    metrics = {"val/clip_score": float(per_view.mean())}
    if len(distinct) >= 2:
        mean_features = torch.nn.functional.normalize(image_features.mean(1), dim=-1)
        similarity = mean_features @ text_features.T
        metrics["val/clip_r_precision"] = float((similarity.argmax(1) == own).float().mean())
    return metrics


def geometry_metrics(
    pairs: Sequence[tuple[Any, torch.Tensor]], num_points: int, threshold: float, seed: int
) -> dict[str, float]:
    """Mean Chamfer distance and F-score (``threshold``) of meshes against point clouds,
    ``num_points`` points each (mesh surface samples; the cloud subsampled), seeded."""
    from genlab.metrics.point_cloud import chamfer_l2, fscore

    rng = np.random.default_rng(seed)
    chamfers, fscores = [], []
    for mesh, cloud in pairs:
        import trimesh

        surface, _ = trimesh.sample.sample_surface(mesh, num_points, seed=int(rng.integers(2**31)))
        target = cloud.numpy()
        if len(target) > num_points:
            target = target[rng.choice(len(target), num_points, replace=False)]
        pred_t = torch.as_tensor(np.asarray(surface), dtype=torch.float32)[None]
        target_t = torch.as_tensor(target, dtype=torch.float32)[None]
        chamfers.append(float(torch.as_tensor(chamfer_l2(pred_t, target_t)).reshape(-1)[0]))
        score = fscore(pred_t, target_t, threshold=threshold)
        fscores.append(float(torch.as_tensor(score["fscore"]).reshape(-1)[0]))
    return {"val/chamfer": float(np.mean(chamfers)), "val/fscore": float(np.mean(fscores))}


def _log_file(loggers: Any, key: str, path: Path, step: int) -> None:
    """Send a file (turntable GIF) to the loggers that take files (ClearML, wandb); the others
    keep it in the run directory."""
    from lightning.pytorch.loggers import WandbLogger

    from genlab.loggers.clearml import ClearMLLogger

    for logger in loggers or []:
        try:
            if isinstance(logger, ClearMLLogger):
                logger.log_file(key, path, step)
            elif isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Video(str(path), format="gif")}, step=step)
        except Exception:  # noqa: BLE001 - a logger failure never stops training
            log.warning("could not log %s to %s", path, type(logger).__name__, exc_info=True)


__all__ = ["ShapEPriorFineTune", "clip_metrics", "geometry_metrics", "load_scheduler_config"]

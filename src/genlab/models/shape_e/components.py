"""The parts of a Shap-E model (diffusers): prior, scheduler, renderer and CLIP conditioning.

Two builders, each usable as a Hydra ``_target_``:

- :func:`pretrained_components` reads ``openai/shap-e`` (text) or ``openai/shap-e-img2img``
  (image), or a local copy, in the hub layout: ``prior/``, ``scheduler/``, ``shap_e_renderer/``
  and ``text_encoder/`` + ``tokenizer/`` or ``image_encoder/`` + ``image_processor/``. Offline
  without a local copy it fails with one line
  (:func:`genlab.pretrained.from_pretrained_or_explain`).
- :func:`tiny_components` builds the same classes from small configs with seeded random
  weights (no download): prior configured like the released ones, the released scheduler
  config, a 2-layer CLIP text model with CLIP's real BPE tokenizer (built offline), or a tiny
  CLIP vision tower + image processor, and a tiny renderer.

A latent is ``(num_embeddings, embedding_dim)`` of the prior, (1024, 1024) for the released
models and (64, 32) for the tiny ones; the renderer's ``param_shapes`` split the token axis
(their vector counts sum to ``num_embeddings``) and its ``d_latent`` is ``embedding_dim``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from genlab.pretrained import from_pretrained_or_explain

__all__ = [
    "SCHEDULER_CONFIG",
    "TINY_IMAGE_ENCODER",
    "TINY_PRIOR",
    "TINY_RENDERER",
    "TINY_TEXT_ENCODER",
    "LatentShapeError",
    "ShapEComponents",
    "pretrained_components",
    "pretrained_renderer",
    "renderer_latent_shape",
    "tiny_components",
    "tiny_renderer",
]

log = logging.getLogger(__name__)

Conditioning = Literal["text", "image"]

#: The released ``scheduler/scheduler_config.json`` of openai/shap-e and shap-e-img2img.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_schedule": "exp",
    "num_train_timesteps": 1024,
    "prediction_type": "sample",
    "use_karras_sigmas": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

#: Tiny prior: latent (64, 32). The released priors use the same switches with
#: embedding_dim = num_embeddings = 1024, 24 layers of 8 x 128 heads.
TINY_PRIOR: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "embedding_dim": 32,
    "num_embeddings": 64,
    "num_layers": 1,
    "time_embed_dim": 128,  # 4 * embedding_dim, as released
    "additional_embeddings": 0,
    "time_embed_act_fn": "gelu",
    "norm_in_type": "layer",
    "encoder_hid_proj_type": None,
    "added_emb_type": None,
}

#: Tiny renderer: 4 x 16 latent tokens -> the first 4 MLP weight matrices of a 16-wide NeRSTF.
TINY_RENDERER: dict[str, Any] = {
    "param_shapes": [[16, 93], [16, 16], [16, 16], [16, 16]],
    "d_latent": 32,
    "d_hidden": 16,
    "n_output": 12,
    "background": [255.0, 255.0, 255.0],
}

#: Tiny CLIP text model with projection (the vocabulary is CLIP's real one).
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

#: Tiny CLIP vision tower (the image prior reads its patch tokens, hidden_size wide).
TINY_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class LatentShapeError(ValueError):
    """A latent whose shape is not the model's ``(num_embeddings, embedding_dim)``."""


@dataclass
class ShapEComponents:
    """What a Shap-E text-to-3D or image-to-3D model is made of (diffusers / transformers classes).

    ``text_encoder`` + ``tokenizer`` are set for text conditioning, ``image_encoder`` +
    ``image_processor`` for image conditioning.
    """

    prior: Any  # diffusers.PriorTransformer
    scheduler: Any  # diffusers.HeunDiscreteScheduler
    renderer: Any  # diffusers.pipelines.shap_e.ShapERenderer
    text_encoder: Any = None  # transformers.CLIPTextModelWithProjection
    tokenizer: Any = None  # transformers.CLIPTokenizer
    image_encoder: Any = None  # transformers.CLIPVisionModel
    image_processor: Any = None  # transformers.CLIPImageProcessor
    source: str = "tiny"

    @property
    def conditioning(self) -> Conditioning:
        return "text" if self.text_encoder is not None else "image"

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(num_embeddings, embedding_dim)`` of one latent."""
        config = self.prior.config
        return int(config.num_embeddings), int(config.embedding_dim)

    def check_latents(self, latents: torch.Tensor, where: str) -> torch.Tensor:
        """``latents`` when shaped ``(E, D)`` or ``(B, E, D)``; else raise, naming ``where``."""
        expected = self.latent_shape
        shape = tuple(latents.shape)
        if shape[-2:] != expected or latents.ndim not in (2, 3):
            raise LatentShapeError(
                f"{where}: latent shape {shape} does not fit this Shap-E model, which expects "
                f"{expected} (num_embeddings, embedding_dim) or (batch, {expected[0]}, "
                f"{expected[1]}); latents made for another model (e.g. the released 1024 x 1024 "
                "ones with a tiny model) cannot be used"
            )
        return latents

    def eval_frozen(self) -> ShapEComponents:
        """Put every part in eval mode (returns self)."""
        for part in (self.prior, self.renderer, self.text_encoder, self.image_encoder):
            if part is not None:
                part.eval()
        return self


def check_renderer_fits_prior(prior: Any, renderer: Any) -> None:
    """Raise when the renderer's ``param_shapes`` / ``d_latent`` do not match the prior's latent."""
    decoded = renderer_latent_shape(renderer)
    latent = (int(prior.config.num_embeddings), int(prior.config.embedding_dim))
    if decoded != latent:
        raise LatentShapeError(
            f"renderer decodes latents of shape {decoded} (sum of param_shapes vectors, "
            f"d_latent) but the prior makes {latent}"
        )


# ------------------------------------------------------------------------------ pretrained


def _hub_default(conditioning: Conditioning) -> str:
    return "openai/shap-e" if conditioning == "text" else "openai/shap-e-img2img"


def pretrained_components(
    pretrained: str | Path | None = None,
    conditioning: Conditioning = "text",
    renderer_pretrained: str | Path | None = None,
    torch_dtype: torch.dtype | str | None = None,
    config_key: str = "model.components.pretrained",
    offline_choice: str = "the tiny model (genlab.models.shape_e.components.tiny_components)",
) -> ShapEComponents:
    """Load a released Shap-E model (hub id or local copy in the hub layout).

    ``pretrained`` defaults to ``openai/shap-e`` (text) or ``openai/shap-e-img2img`` (image).
    ``renderer_pretrained`` takes ``shap_e_renderer/`` from another copy (both released repos
    hold the same renderer). ``torch_dtype``: e.g. ``"float16"`` for the prior and encoders.
    ``config_key`` / ``offline_choice`` name the setting and the offline alternative in the
    one-line error raised when the weights are not available.
    """
    from diffusers import HeunDiscreteScheduler, PriorTransformer
    from diffusers.pipelines.shap_e import ShapERenderer

    if conditioning not in ("text", "image"):
        raise ValueError(f"conditioning must be 'text' or 'image', got {conditioning!r}")
    spec = str(pretrained or _hub_default(conditioning))
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    weights: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}

    def load(cls: Any, source: str, subfolder: str, key: str = config_key, **kwargs: Any) -> Any:
        return from_pretrained_or_explain(
            cls,
            source,
            key,
            offline_choice,
            what=f"Shap-E {subfolder}",
            subfolder=subfolder,
            **kwargs,
        )

    parts: dict[str, Any] = {
        "prior": load(PriorTransformer, spec, "prior", **weights),
        "scheduler": load(HeunDiscreteScheduler, spec, "scheduler"),
        "renderer": load(
            ShapERenderer,
            str(renderer_pretrained or spec),
            "shap_e_renderer",
            key="model.components.renderer_pretrained" if renderer_pretrained else config_key,
        ),
    }
    if conditioning == "text":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts["tokenizer"] = load(CLIPTokenizer, spec, "tokenizer")
        parts["text_encoder"] = load(
            CLIPTextModelWithProjection, spec, "text_encoder", **_dtype(torch_dtype)
        )
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        parts["image_processor"] = load(CLIPImageProcessor, spec, "image_processor")
        parts["image_encoder"] = load(CLIPVisionModel, spec, "image_encoder", **_dtype(torch_dtype))
    check_renderer_fits_prior(parts["prior"], parts["renderer"])
    log.info("loaded Shap-E (%s conditioning) from %s", conditioning, spec)
    return ShapEComponents(source=spec, **parts).eval_frozen()


def _dtype(torch_dtype: torch.dtype | None) -> dict[str, Any]:
    """transformers 5 names the dtype argument ``dtype``."""
    return {"dtype": torch_dtype} if torch_dtype is not None else {}


# ------------------------------------------------------------------------------ tiny


def _plain(value: Any) -> Any:
    """Config nodes (DictConfig/ListConfig) and tuples -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def tiny_components(
    conditioning: Conditioning = "text",
    seed: int = 0,
    prior: Mapping[str, Any] | None = None,
    renderer: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
    image_encoder: Mapping[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> ShapEComponents:
    """Random-weight Shap-E parts from configs (defaults: the ``TINY_*`` dicts of this module).

    Each config updates the default one. The weights depend on ``seed`` only (the global RNG is
    left untouched), so a rebuilt tiny model is the same model. ``embedding_proj_dim`` and
    ``clip_embed_dim`` of the prior follow from the CLIP part and the latent width as in the
    released models; ``embedding_proj_norm_type`` is ``"layer"`` for image conditioning (as in
    shap-e-img2img) and none for text (as in shap-e).
    """
    from diffusers import HeunDiscreteScheduler, PriorTransformer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    from genlab.models.lora_sd.components import TOKENIZER_MAX_LENGTH, clip_bpe_tokenizer

    if conditioning not in ("text", "image"):
        raise ValueError(f"conditioning must be 'text' or 'image', got {conditioning!r}")
    prior_config = {**TINY_PRIOR, **_plain(prior or {})}
    parts: dict[str, Any] = {"renderer": tiny_renderer(seed, **_plain(renderer or {}))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if conditioning == "text":
            text_config = {**TINY_TEXT_ENCODER, **_plain(text_encoder or {})}
            clip = CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=TOKENIZER_MAX_LENGTH,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                hidden_act="gelu",
                **text_config,
            )
            parts["text_encoder"] = CLIPTextModelWithProjection(clip)
            prior_config.setdefault("embedding_proj_dim", clip.projection_dim)
        else:
            vision_config = {**TINY_IMAGE_ENCODER, **_plain(image_encoder or {})}
            vision = CLIPVisionConfig(hidden_act="gelu", **vision_config)
            parts["image_encoder"] = CLIPVisionModel(vision)
            size = int(vision.image_size)
            parts["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                do_center_crop=True,
                do_normalize=True,
                do_resize=True,
                image_mean=_CLIP_MEAN,
                image_std=_CLIP_STD,
                resample=3,
            )
            prior_config.setdefault("embedding_proj_dim", vision.hidden_size)
            prior_config.setdefault("embedding_proj_norm_type", "layer")
        prior_config.setdefault("clip_embed_dim", 2 * int(prior_config["embedding_dim"]))
        parts["prior"] = PriorTransformer(**prior_config)
    if conditioning == "text":
        parts["tokenizer"] = clip_bpe_tokenizer(tokenizer_dir)
    with torch.device("cpu"):  # its tables go through numpy, also under a CUDA default device
        parts["scheduler"] = HeunDiscreteScheduler(**SCHEDULER_CONFIG)
    check_renderer_fits_prior(parts["prior"], parts["renderer"])
    return ShapEComponents(source="tiny", **parts).eval_frozen()


# ------------------------------------------------------------------------------ renderer only


def renderer_latent_shape(renderer: Any) -> tuple[int, int]:
    """``(sum of param_shapes vectors, d_latent)``: the latent shape ``renderer`` decodes."""
    config = renderer.config
    return sum(int(v) for v, _ in config.param_shapes), int(config.d_latent)


def tiny_renderer(seed: int = 0, **config: Any) -> Any:
    """A random-weight ``ShapERenderer`` from :data:`TINY_RENDERER` updated with ``config``.

    The weights depend on ``seed`` only; :func:`tiny_components` builds its renderer with this
    function, so the same seed gives the same renderer here and there.
    """
    from diffusers.pipelines.shap_e import ShapERenderer

    options = {**TINY_RENDERER, **_plain(config)}
    options["param_shapes"] = tuple(tuple(s) for s in options["param_shapes"])
    options["background"] = tuple(options["background"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapERenderer(**options).eval()


def pretrained_renderer(
    pretrained: str | Path = "openai/shap-e",
    config_key: str = "model.renderer.pretrained",
    offline_choice: str = "the tiny renderer (genlab.models.shape_e.components.tiny_renderer)",
) -> Any:
    """``shap_e_renderer/`` of a released Shap-E model (hub id or local copy), in eval mode."""
    from diffusers.pipelines.shap_e import ShapERenderer

    return from_pretrained_or_explain(
        ShapERenderer,
        str(pretrained),
        config_key,
        offline_choice,
        what="Shap-E renderer",
        subfolder="shap_e_renderer",
    ).eval()

"""The parts of a Stable Diffusion model: UNet, VAE, text encoder(s), tokenizer(s), noise scheduler.

Two ways to get them:

- :func:`load_components` reads a hub id or a local folder in diffusers layout
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
  and, for SDXL, ``text_encoder_2/`` and ``tokenizer_2/``). Whether it is SD 1.x/2.x or SDXL is
  read from the folder (:func:`detect_architecture`), never from a flag.
- :func:`build_tiny_components` builds the same classes from small configs with seeded random
  weights, and a real CLIP BPE tokenizer made offline from the merges file that open_clip ships
  (:func:`clip_bpe_tokenizer`). :meth:`Components.save_pretrained` writes them as a diffusers
  folder, so the loading path can be exercised without downloading anything.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from genlab.atomic import write_text_atomic
from genlab.pretrained import local_path, weights_unavailable

log = logging.getLogger(__name__)

Architecture = Literal["sd", "sdxl"]
TOKENIZER_MAX_LENGTH = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# the CLIP BPE file's first line is a header; the next 48894 lines are the merges CLIP uses
_NUM_MERGES = 49152 - 256 - 2


class ArchitectureError(ValueError):
    """A pretrained folder that is neither an SD 1.x/2.x nor an SDXL text-to-image model."""


@dataclass
class Components:
    """What a Stable Diffusion (``"sd"``) or SDXL (``"sdxl"``) text-to-image model is made of."""

    architecture: Architecture
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler
    text_encoder_2: Any = None  # transformers.CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any = None
    source: str = "tiny"

    @property
    def is_sdxl(self) -> bool:
        return self.architecture == "sdxl"

    @property
    def text_encoders(self) -> list[Any]:
        return [self.text_encoder, *([self.text_encoder_2] if self.is_sdxl else [])]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, *([self.tokenizer_2] if self.is_sdxl else [])]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-layout folder (``model_index.json`` + one subfolder per part)."""
        folder = Path(folder)
        assemble_pipeline(self).save_pretrained(str(folder), safe_serialization=True)
        return folder


# ------------------------------------------------------------------------------ architecture


def detect_architecture(
    model_index: Mapping[str, Any] | None, unet_config: Mapping[str, Any]
) -> Architecture:
    """``"sdxl"`` when the UNet takes SDXL's size/crop + pooled-text conditioning, else ``"sd"``.

    The UNet config decides (``addition_embed_type == "text_time"``); ``model_index.json`` must
    agree with it (a ``text_encoder_2`` entry for SDXL, none for SD) and name a ``text_encoder``
    (SDXL refiners, which have only the second encoder, are not text-to-image bases).
    """
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    if unet_config.get("addition_embed_type") not in (None, "text_time"):
        raise ArchitectureError(
            f"unet addition_embed_type={unet_config.get('addition_embed_type')!r}: "
            "only SD 1.x/2.x (none) and SDXL ('text_time') UNets are supported"
        )
    if model_index is not None:

        def present(name: str) -> bool:
            entry = model_index.get(name)
            return bool(entry) and any(part is not None for part in entry)

        if not present("text_encoder"):
            raise ArchitectureError(
                "model_index.json names no text_encoder (an SDXL refiner?): "
                "a text-to-image base model (SD 1.x/2.x or SDXL base) is needed"
            )
        if present("text_encoder_2") != sdxl:
            raise ArchitectureError(
                "model_index.json and unet/config.json disagree: "
                f"text_encoder_2 {'present' if present('text_encoder_2') else 'absent'} but "
                f"unet addition_embed_type={unet_config.get('addition_embed_type')!r}"
            )
    return "sdxl" if sdxl else "sd"


# ------------------------------------------------------------------------------ loading


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):  # older huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_components(
    pretrained: str | os.PathLike[str],
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    config_key: str = "model.pretrained",
    tiny_choice: str = "model=lora_sd_tiny (or model=lora_sdxl_tiny)",
) -> Components:
    """Load every part of ``pretrained`` (hub id or local diffusers folder) in float32.

    A local folder is read with ``local_files_only`` (no network); so is a hub id when
    ``HF_HUB_OFFLINE`` is set. When the weights cannot be had, one line says so, naming
    ``config_key`` and ``tiny_choice`` (:func:`genlab.pretrained.weights_unavailable`).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = str(pretrained)
    local = local_path(spec)
    if local is not None:
        spec = str(local)
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{config_key}={pretrained}: a local folder but not in diffusers layout "
                "(no model_index.json)"
            )
    only_local = (local is not None or _offline()) if local_files_only is None else local_files_only
    hub: dict[str, Any] = {"local_files_only": only_local, "revision": revision}
    weights: dict[str, Any] = {**hub, "variant": variant}
    try:
        model_index = DiffusionPipeline.load_config(spec, **hub)
        unet_config = UNet2DConditionModel.load_config(spec, subfolder="unet", **hub)
        architecture = detect_architecture(model_index, unet_config)
        parts: dict[str, Any] = {
            "tokenizer": CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", **hub),
            "text_encoder": CLIPTextModel.from_pretrained(
                spec, subfolder="text_encoder", dtype=torch.float32, **weights
            ),
            "noise_scheduler": DDPMScheduler.from_pretrained(spec, subfolder="scheduler", **hub),
            "vae": AutoencoderKL.from_pretrained(
                spec, subfolder="vae", torch_dtype=torch.float32, **weights
            ),
            "unet": UNet2DConditionModel.from_pretrained(
                spec, subfolder="unet", torch_dtype=torch.float32, **weights
            ),
        }
        if architecture == "sdxl":
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                spec, subfolder="tokenizer_2", **hub
            )
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                spec, subfolder="text_encoder_2", dtype=torch.float32, **weights
            )
    except ArchitectureError as err:
        raise ArchitectureError(f"{config_key}={pretrained}: {err}") from None
    except (OSError, ValueError) as err:
        if local is not None:
            reason = " ".join(str(err).split())[:300]
            raise FileNotFoundError(
                f"{config_key}={pretrained}: cannot load this diffusers folder ({reason})"
            ) from err
        raise weights_unavailable(
            "Stable Diffusion", str(pretrained), config_key, err, tiny_choice
        ) from err
    log.info("loaded %s (%s) from %s", architecture.upper(), type(parts["unet"]).__name__, spec)
    return Components(architecture=architecture, source=str(pretrained), **parts)


# ------------------------------------------------------------------------------ tiny models


def _cache_root() -> Path:
    return Path(os.environ.get("GENLAB_CACHE_DIR", ".cache/genlab"))


def write_clip_bpe_files(folder: str | Path) -> Path:
    """Write CLIP's ``vocab.json`` + ``merges.txt`` into ``folder`` (once) from open_clip's BPE file.

    The vocabulary is built as CLIP builds it: the 256 byte symbols, the same with the ``</w>``
    end-of-word mark, one token per merge, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407). Files are written atomically, so concurrent callers are safe.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return folder
    with gzip.open(default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    tokens += [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    write_text_atomic(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_text_atomic(vocab_file, json.dumps(vocab, ensure_ascii=False))
    return folder


def clip_bpe_tokenizer(cache_dir: str | Path | None = None, pad_token: str = _EOS) -> Any:
    """A ``transformers.CLIPTokenizer`` with CLIP's real 49408-token BPE, built without downloads.

    ``pad_token``: ``<|endoftext|>`` as in SD 1.x's tokenizer, ``"!"`` (id 0) as in SD 2.x's and
    SDXL's second tokenizer. Vocabulary files are cached in ``cache_dir``
    (default ``$GENLAB_CACHE_DIR/clip_bpe_tokenizer``).
    """
    from transformers import CLIPTokenizer

    folder = write_clip_bpe_files(
        Path(cache_dir) if cache_dir else _cache_root() / "clip_bpe_tokenizer"
    )
    return CLIPTokenizer.from_pretrained(
        str(folder),
        local_files_only=True,
        model_max_length=TOKENIZER_MAX_LENGTH,
        pad_token=pad_token,
    )


def _plain(value: Any) -> Any:
    """Config node (DictConfig/ListConfig) -> plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _text_config(options: Mapping[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    defaults = {
        "vocab_size": 49408,
        "max_position_embeddings": TOKENIZER_MAX_LENGTH,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "hidden_act": "gelu",
    }
    return CLIPTextConfig(**{**defaults, **_plain(options)})


def build_tiny_components(
    unet: Mapping[str, Any],
    vae: Mapping[str, Any],
    text_encoder: Mapping[str, Any],
    text_encoder_2: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> Components:
    """Random-weight components from config dicts (the keyword arguments of each class).

    The weights come from ``seed`` only (the global RNG is left untouched), so a rebuilt tiny
    model is the same model: LoRA checkpoints, which hold no base weights, stay meaningful.
    SDXL is detected from the UNet config exactly as for a pretrained folder; it then needs
    ``text_encoder_2`` (a ``CLIPTextModelWithProjection`` config).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet_config = _plain(unet)
    architecture = detect_architecture(None, unet_config)
    if architecture == "sdxl" and not text_encoder_2:
        raise ArchitectureError(
            "an SDXL UNet (addition_embed_type: text_time) needs text_encoder_2"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel(**unet_config),
            "vae": AutoencoderKL(**_plain(vae)),
            "text_encoder": CLIPTextModel(_text_config(text_encoder)),
        }
        if architecture == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                _text_config({"pad_token_id": 0, **_plain(text_encoder_2)})
            )
    parts["tokenizer"] = clip_bpe_tokenizer(tokenizer_dir)
    if architecture == "sdxl":
        parts["tokenizer_2"] = clip_bpe_tokenizer(tokenizer_dir, pad_token="!")
    parts["noise_scheduler"] = DDPMScheduler(**_plain(scheduler or {}))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].eval()
    return Components(architecture=architecture, source="tiny", **parts)


# ------------------------------------------------------------------------------ pipelines


def assemble_pipeline(components: Components, scheduler: Any = None) -> Any:
    """A diffusers text-to-image pipeline over the live ``components`` (no copies; safety checker off).

    ``scheduler`` (a diffusers scheduler instance) replaces the noise scheduler for sampling.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": components.unet,
        "scheduler": scheduler if scheduler is not None else components.noise_scheduler,
    }
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
            add_watermarker=False,
            **common,
        )
    else:
        pipe = StableDiffusionPipeline(
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **common,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""LoRA adapters on a Stable Diffusion model: injection (peft), export and import.

Adapters are peft ``LoraConfig`` layers added with the models' own ``add_adapter`` (diffusers'
UNet, transformers' CLIP text encoders), under peft's ``"default"`` adapter name. Files:

- diffusers format (``pytorch_lora_weights.safetensors``): keys ``unet.<module>.lora.down.weight``
  / ``text_encoder.<module>.lora_linear_layer.up.weight`` ..., with each part's ``LoraConfig``
  in the safetensors metadata so that rank and alpha come back exactly;
  ``pipe.load_lora_weights(folder)`` reads it.
- kohya / A1111 format (``lora_kohya.safetensors``): ``lora_unet_<module>.lora_down.weight``,
  ``lora_te1_...``/``lora_te2_...`` and one ``.alpha`` per module (the configured alpha, so
  the scale alpha/rank survives). Module names are diffusers' (what kohya's trainer writes for
  SD 1.x/2.x; ComfyUI and diffusers also read them for SDXL).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genlab.models.lora_sd.components import Components

log = logging.getLogger(__name__)

ADAPTER = "default"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# which text encoder gets which prefix, in files and in the module
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


@dataclass
class LoRASettings:
    """What ``model.lora`` configures.

    ``init``: peft's ``init_lora_weights`` (``true``: Kaiming A and zero B, so training starts at
    the base model; ``"gaussian"``: Gaussian A, zero B; ``false``: random B too, for tests).
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: Sequence[str] = UNET_TARGETS
    train_text_encoder: bool = False
    text_encoder_target_modules: Sequence[str] = TEXT_TARGETS
    init: bool | str = True

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> LoRASettings:
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"model.lora: unknown key(s) {unknown}; known: {sorted(known)}")
        settings = cls(**options)
        if settings.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {settings.rank}")
        settings.target_modules = list(settings.target_modules)
        settings.text_encoder_target_modules = list(settings.text_encoder_target_modules)
        return settings

    def config(self, text_encoder: bool = False) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=int(self.rank),
            lora_alpha=float(self.alpha),
            lora_dropout=float(self.dropout),
            init_lora_weights=self.init,
            target_modules=list(
                self.text_encoder_target_modules if text_encoder else self.target_modules
            ),
        )


def adapted_parts(components: Components, settings: LoRASettings) -> dict[str, torch.nn.Module]:
    """``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``: the models that carry LoRA."""
    parts: dict[str, torch.nn.Module] = {"unet": components.unet}
    if settings.train_text_encoder:
        for name, encoder in zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False):
            parts[name] = encoder
    return parts


def add_lora(components: Components, settings: LoRASettings) -> dict[str, torch.nn.Module]:
    """Freeze every base weight, add the adapters, and return the adapted parts.

    Only ``lora_A``/``lora_B`` weights require gradients afterwards.
    """
    for model in (components.unet, components.vae, *components.text_encoders):
        model.requires_grad_(False)
    parts = adapted_parts(components, settings)
    for name, model in parts.items():
        if name == "unet":
            model.add_adapter(settings.config())  # diffusers' PEFT integration
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(settings.config(text_encoder=True), model, adapter_name=ADAPTER)
    trainable = [
        n for model in parts.values() for n, p in model.named_parameters() if p.requires_grad
    ]
    stray = [n for n in trainable if "lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(
            f"LoRA injection left unexpected trainable parameters: {stray[:5]}"
            if stray
            else "LoRA injection matched no module: check model.lora.target_modules"
        )
    return parts


# ------------------------------------------------------------------------------ state dicts


def set_adapters_enabled(parts: Mapping[str, torch.nn.Module], enabled: bool) -> None:
    """Switch every LoRA layer of ``parts`` on or off (off: the base model's outputs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in parts.values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


def _file_prefix(name: str, model: torch.nn.Module) -> str:
    """``"text_model."`` for a text encoder whose modules sit at the top level.

    Recent transformers flatten ``CLIPTextModel`` (``encoder.layers...``); LoRA files everywhere
    (older transformers, A1111, ComfyUI) name them ``text_model.encoder.layers...``, which
    diffusers also accepts for flattened models. Files are written in that canonical naming.
    """
    if name == "unet" or hasattr(model, "text_model"):
        return ""
    return "text_model."


def peft_state_dicts(parts: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Per part, the adapter weights with peft keys (``<module>.lora_A.weight``), on CPU, fp32.

    Text-encoder keys use the canonical ``text_model.`` naming (see :func:`_file_prefix`).
    """
    marker = f".{ADAPTER}."
    return {
        name: {
            _file_prefix(name, model) + key.replace(marker, "."): value.detach()
            .to("cpu", torch.float32)
            .contiguous()
            for key, value in model.named_parameters()
            if marker in key and ".lora_" in key
        }
        for name, model in parts.items()
    }


def set_peft_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Copy peft-keyed adapter weights (``<module>.lora_A.weight``) into ``model``'s adapters."""
    marker = f".{ADAPTER}."
    live = {k: p for k, p in model.named_parameters() if marker in k and ".lora_" in k}
    flat = not hasattr(model, "text_model")
    mapped = {}
    for key, value in state.items():
        if flat and key.startswith("text_model."):
            key = key.removeprefix("text_model.")
        for kind in (".lora_A.", ".lora_B."):
            if kind in key:
                key = key.replace(kind, f"{kind[:-1]}{marker}")
                break
        mapped[key] = value
    unexpected = sorted(set(mapped) - set(live))
    missing = sorted(set(live) - set(mapped))
    if unexpected or missing:
        raise ValueError(
            f"LoRA weights do not match the adapters: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    with torch.no_grad():
        for key, value in mapped.items():
            if live[key].shape != value.shape:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} in the file, {tuple(live[key].shape)} "
                    "here (another rank?)"
                )
            live[key].copy_(value)
    return len(mapped)


def diffusers_state_dict(
    parts: Mapping[str, torch.nn.Module],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per part, the adapter weights in diffusers' naming (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return {
        name: convert_state_dict_to_diffusers(sd) for name, sd in peft_state_dicts(parts).items()
    }


def kohya_state_dict(
    parts: Mapping[str, torch.nn.Module], settings: LoRASettings
) -> dict[str, torch.Tensor]:
    """All adapter weights in kohya/A1111 naming, with the configured alpha per module."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {
        f"{name}.{key}": value
        for name, state in peft_state_dicts(parts).items()
        for key, value in state.items()
    }
    state = convert_state_dict_to_kohya(prefixed)
    for key in [k for k in state if k.endswith(".alpha")]:
        # the converter writes alpha = rank (scale 1); the adapters were trained at alpha / rank
        state[key] = torch.tensor(float(settings.alpha))
    return state


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_diffusers_lora(
    folder: str | Path,
    components: Components,
    parts: Mapping[str, torch.nn.Module],
    settings: LoRASettings,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> Path:
    """Write ``folder/weight_name`` for ``pipe.load_lora_weights(folder)`` (atomically)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    states = diffusers_state_dict(parts)
    metadata = {name: settings.config(text_encoder=name != "unet").to_dict() for name in states}
    pipeline_cls = StableDiffusionXLPipeline if components.is_sdxl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {
        "unet_lora_layers": states["unet"],
        "unet_lora_adapter_metadata": metadata["unet"],
    }
    for name in TEXT_ENCODER_NAMES:
        if name in states:
            kwargs[f"{name}_lora_layers"] = states[name]
            kwargs[f"{name}_lora_adapter_metadata"] = metadata[name]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        pipeline_cls.save_lora_weights(tmp, weight_name=weight_name, **kwargs)
        os.replace(Path(tmp) / weight_name, folder / weight_name)
    return folder / weight_name


def save_kohya_lora(
    path: str | Path, parts: Mapping[str, torch.nn.Module], settings: LoRASettings
) -> Path:
    """Write the adapters as one kohya/A1111-style safetensors file (atomically)."""
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
    }
    return _save_atomic(kohya_state_dict(parts, settings), Path(path), meta)


# ------------------------------------------------------------------------------ import


def is_lora_file_state(state: Mapping[str, Any]) -> bool:
    """True for a diffusers- or kohya-format LoRA state dict (not genlab's own module keys)."""
    keys = list(state)
    return bool(keys) and (
        all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)
        or any(".lora.down." in k or ".lora_linear_layer." in k for k in keys)
        or (
            all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
            and any(".lora_A." in k for k in keys)
            and not any(f".{ADAPTER}." in k for k in keys)
        )
    )


def load_lora_into(
    source: str | Path | Mapping[str, torch.Tensor],
    components: Components,
    parts: Mapping[str, torch.nn.Module],
    settings: LoRASettings,
) -> dict[str, int]:
    """Copy LoRA weights from a diffusers/kohya file, folder or state dict into the live adapters.

    The adapters must already exist with the same rank and targets; an adapter for a part
    that is not adapted here (e.g. text-encoder LoRA when ``train_text_encoder`` is false)
    raises. Returns the number of tensors loaded per part.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    pipeline_cls = StableDiffusionXLPipeline if components.is_sdxl else StableDiffusionPipeline
    if isinstance(source, Mapping):
        state = dict(source)
        if all(k.startswith(("lora_unet_", "lora_te")) for k in state):
            state, alphas = pipeline_cls.lora_state_dict(state, unet_config=components.unet.config)
        else:
            alphas = None
    else:
        path = Path(source)
        kwargs: dict[str, Any] = {"unet_config": components.unet.config, "local_files_only": True}
        if path.is_file():
            kwargs["weight_name"] = path.name
            path = path.parent
        state, alphas = pipeline_cls.lora_state_dict(str(path), **kwargs)
    if alphas:
        found = {float(v) for v in alphas.values()}
        if found != {float(settings.alpha)}:
            log.warning(
                "LoRA file alphas %s differ from model.lora.alpha=%s: the live scale is kept",
                sorted(found),
                settings.alpha,
            )
    loaded: dict[str, int] = {}
    for name in ("unet", *TEXT_ENCODER_NAMES):
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        if not sub:
            continue
        if name not in parts:
            raise ValueError(
                f"the LoRA file has {name} adapters but this model adapts only {sorted(parts)}"
                + (" (set model.lora.train_text_encoder=true)" if name != "unet" else "")
            )
        model = parts[name]
        sub = (
            convert_unet_state_dict_to_peft(sub)
            if name == "unet"
            else convert_state_dict_to_peft(sub)
        )
        try:
            loaded[name] = set_peft_state_dict(model, sub)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if not loaded:
        raise ValueError("no unet/text_encoder LoRA weights found in the given state")
    return loaded

"""What of the Shap-E prior trains, and how: parameter selection, LoRA (peft), EMA, checkpointing."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoRASettings",
    "TrainableEMA",
    "add_prior_lora",
    "enable_block_checkpointing",
    "load_prior_lora",
    "save_prior_lora",
    "select_trainable",
]

LORA_WEIGHT_NAME = "prior_lora.safetensors"
#: PriorTransformer parameters that Shap-E's forward never uses (unCLIP's embedding statistics,
#: read only by ``post_process_latents``): never trained, so no optimiser state and no unused
#: parameters under DDP.
UNUSED_PRIOR_PARAMETERS = ("clip_mean", "clip_std")


@dataclass
class LoRASettings:
    """peft ``LoraConfig`` arguments for the prior's attention projections."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: Any = True

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any] | None) -> LoRASettings:
        given = dict(given or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"model.lora: unknown key(s) {unknown}; known: {sorted(known)}")
        settings = cls(**given)
        settings.target_modules = [str(m) for m in settings.target_modules]
        if int(settings.rank) < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {settings.rank}")
        return settings


def _matching(names: Sequence[str], prefixes: Sequence[str]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(f"{p}.") for p in prefixes)}


def select_trainable(
    prior: nn.Module, trainable: Sequence[str] | None, frozen: Sequence[str] | None
) -> list[str]:
    """Set ``requires_grad`` on the prior: the parameters under ``trainable`` (module or
    parameter name prefixes; None: all) minus those under ``frozen`` (and the unused
    :data:`UNUSED_PRIOR_PARAMETERS`). Returns the trained names.

    A prefix that matches nothing is an error naming the prior's top-level parts.
    """
    names = [n for n, _ in prior.named_parameters()]
    tops = sorted({n.split(".")[0] for n in names})
    for what, prefixes in (("trainable", trainable), ("frozen", frozen)):
        for prefix in prefixes or []:
            if not _matching(names, [prefix]):
                raise ValueError(
                    f"model.{what}: {prefix!r} names no parameter of the prior; its parts are "
                    f"{tops} (use dotted names such as 'transformer_blocks.0')"
                )
    chosen = set(names) if trainable is None else _matching(names, list(trainable))
    chosen -= _matching(names, [*(frozen or []), *UNUSED_PRIOR_PARAMETERS])
    for name, param in prior.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)


# ------------------------------------------------------------------------------ LoRA


def add_prior_lora(prior: nn.Module, settings: LoRASettings) -> list[str]:
    """Freeze the prior and add peft LoRA adapters on ``settings.target_modules``; returns the
    names of the LoRA parameters (the only trainable ones)."""
    from peft import LoraConfig

    prior.requires_grad_(False)
    prior.add_adapter(
        LoraConfig(
            r=int(settings.rank),
            lora_alpha=float(settings.alpha),
            lora_dropout=float(settings.dropout),
            init_lora_weights=settings.init,
            target_modules=list(settings.target_modules),
        )
    )
    names = [n for n, p in prior.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(
            f"model.lora.target_modules={settings.target_modules} matched no layer of the prior"
        )
    return names


def save_prior_lora(prior: nn.Module, path: str | Path, settings: LoRASettings) -> Path:
    """The prior's LoRA weights (peft names, adapter name removed) as safetensors."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    from genlab.atomic import write_bytes_atomic

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(prior).items()}
    metadata = {
        "format": "pt",
        "rank": str(int(settings.rank)),
        "alpha": str(float(settings.alpha)),
        "target_modules": ",".join(settings.target_modules),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, save(state, metadata=metadata))
    return path


def load_prior_lora(prior: nn.Module, path: str | Path) -> int:
    """Copy LoRA weights written by :func:`save_prior_lora` into the prior's adapters; returns
    how many tensors were loaded. Missing or extra keys are an error naming the file."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    state = load_file(str(path))
    expected = set(get_peft_model_state_dict(prior))
    if set(state) != expected:
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        raise ValueError(
            f"{path}: LoRA weights do not fit this prior's adapters: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); check model.lora"
        )
    live = get_peft_model_state_dict(prior)
    wrong = sorted(k for k in state if tuple(state[k].shape) != tuple(live[k].shape))
    if wrong:
        raise ValueError(
            f"{path}: LoRA weights of another shape than this prior's adapters, e.g. {wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} in the file, {tuple(live[wrong[0]].shape)} here "
            "(another model.lora.rank?)"
        )
    set_peft_model_state_dict(prior, state)
    return len(state)


# ------------------------------------------------------------------------------ EMA


def _buffer_name(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


class TrainableEMA(nn.Module):
    """Exponential moving average of a module's *trainable* parameters (frozen ones are never
    copied): ``shadow = decay * shadow + (1 - decay) * param`` after each optimiser step.

    The shadows are buffers, so they are saved in checkpoints. :meth:`swapped` puts the averaged
    weights into the module inside a ``with`` block (validation, sampling, export).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.ema.decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.register_buffer(_buffer_name(name), param.detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, _buffer_name(n)) for n in self.names]

    def _params(self, module: nn.Module) -> list[nn.Parameter]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [p.detach().float() for p in self._params(module)]
        torch._foreach_lerp_(self.shadows(), params, 1.0 - self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        params = self._params(module)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadows(), strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)


# ------------------------------------------------------------------------------ checkpointing


def enable_block_checkpointing(prior: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (PriorTransformer
    has no built-in gradient checkpointing). Parameter names are unchanged. Returns the count."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(prior, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(prior).__name__} has no transformer_blocks to checkpoint")
    for block in blocks:
        if getattr(block, "_genlab_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed
        block._genlab_checkpointed = True
    return len(blocks)

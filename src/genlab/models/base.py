"""Pieces every genlab LightningModule shares: frozen parts kept out of checkpoints, weight export."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class GenerativeModule(pl.LightningModule):
    """Base LightningModule.

    Submodules named in ``frozen_modules`` (pretrained encoders, base models) are rebuilt from the
    config, so they are left out of ``state_dict`` (checkpoints stay small) and restored from the
    live module on load. Subclasses implement ``sample(prompts, num_per_prompt, generator)``.
    """

    frozen_modules: tuple[str, ...] = ()
    main_metric: str | None = None

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.frozen_modules)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        frozen = tuple(prefix + p for p in self._frozen_prefixes())
        return type(state)((k, v) for k, v in state.items() if not k.startswith(frozen))

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        merged = dict(state_dict)
        for key, value in super().state_dict().items():
            if key.startswith(self._frozen_prefixes()):
                merged.setdefault(key, value)
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` as Lightning applies it, and by norm under FSDP too.

        Lightning refuses norm clipping under FSDP (``clip_grad_norm_`` over one rank's shards
        would use a wrong norm); the root FSDP wrapper's own ``clip_grad_norm_`` takes the norm
        over every rank's shards, so that is what runs there (on every rank, as the hook does).
        """
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        by_norm = gradient_clip_algorithm is None or gradient_clip_algorithm == "norm"
        if gradient_clip_val and by_norm and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def export_weights(self, path: str | Path) -> Path:
        """Write the trainable weights (no frozen parts) as safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "class": type(self).__qualname__})
        tmp.replace(path)
        return path


def load_partial_state(
    module: torch.nn.Module,
    state_dict: Mapping[str, Any],
    expected: set[str],
    strict: bool,
    assign: bool,
    what: str,
) -> tuple[list[str], Any]:
    """Load a state dict that holds only ``expected`` keys (the trained ones) into ``module``.

    Every other weight keeps its live value. Keys the module does not have, expected keys
    the file lacks (``strict``) and tensors of another shape raise one ``RuntimeError``
    starting with ``what`` and listing examples of each. Returns the keys loaded that were
    not expected (e.g. frozen base weights) and the usual ``_IncompatibleKeys``.
    """
    live = torch.nn.Module.state_dict(module)
    unexpected = sorted(k for k in state_dict if k not in live)
    missing = sorted(expected - set(state_dict))
    mismatched = sorted(
        k for k in state_dict if k in live and tuple(state_dict[k].shape) != tuple(live[k].shape)
    )
    if mismatched or (strict and (missing or unexpected)):
        example = (
            f": {mismatched[0]} is {tuple(state_dict[mismatched[0]].shape)} in the file, "
            f"{tuple(live[mismatched[0]].shape)} here"
            if mismatched
            else ""
        )
        raise RuntimeError(
            f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} of another shape{example}"
        )
    merged = dict(live)
    merged.update({k: v for k, v in state_dict.items() if k in live})
    torch.nn.Module.load_state_dict(module, merged, strict=True, assign=assign)
    extra = sorted(k for k in state_dict if k in live and k not in expected)
    return extra, torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a Lightning ``.ckpt`` (weights only, no pickled code) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path}: not a readable checkpoint ({str(err).splitlines()[0][:200]})"
            ) from err
        if "state_dict" not in ckpt:
            raise ValueError(
                f"{path}: no 'state_dict' in this checkpoint (keys: {sorted(ckpt)[:8]})"
            )
        state = ckpt["state_dict"]
    module.load_state_dict(state)

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

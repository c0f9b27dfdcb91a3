"""Pieces every genlab LightningModule shares: frozen parts kept out of checkpoints, weight export."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# segments that FSDP and activation checkpointing put into the names of the submodules they wrap
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# while set, state dicts keep the weights checkpoints leave out (see ``every_weight``)
_EVERY_WEIGHT: ContextVar[bool] = ContextVar("every_weight", default=False)


def plain_name(name: str) -> str:
    """``name`` without the segments that FSDP / activation-checkpoint wrappers add."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@contextmanager
def every_weight() -> Iterator[None]:
    """State dicts of genlab modules taken inside hold every weight, frozen ones too."""
    token = _EVERY_WEIGHT.set(True)
    try:
        yield
    finally:
        _EVERY_WEIGHT.reset(token)


def drop_unsaved_keys(module: GenerativeModule, state: dict, prefix: str = "") -> None:
    """Remove from ``state`` (in place) the keys under ``prefix`` that checkpoints leave out."""
    saved = module.saved_keys()
    for key in [k for k in state if k.startswith(prefix)]:
        if not saved(plain_name(key[len(prefix) :])):
            del state[key]


def _drop_unsaved(module: GenerativeModule, state: dict, prefix: str, _meta: Any) -> None:
    """State-dict hook: remove what checkpoints leave out, in place.

    A hook rather than a ``state_dict`` override, so it also applies when a DeepSpeed engine
    collects this module's weights. Inside an FSDP wrapper (``prefix`` holds its segment) the
    keys stay: the wrapper's own hook, which runs after this one, needs every weight of its
    unit; there ``on_save_checkpoint`` and the export drop them instead.
    """
    if _EVERY_WEIGHT.get() or any(segment in prefix for segment in WRAPPER_SEGMENTS):
        return
    drop_unsaved_keys(module, state, prefix)


def _forgive_unsaved(module: GenerativeModule, incompatible: Any) -> None:
    """Load hook: weights that checkpoints leave out are not missing (they keep live values)."""
    saved = module.saved_keys()
    # names, not a state dict: under an FSDP load, a state dict would gather the shards again
    named = (
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    )
    own = {plain_name(n) for n, _ in named}
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if plain_name(k) not in own or saved(plain_name(k))]


class GenerativeModule(pl.LightningModule):
    """Base LightningModule.

    Submodules named in ``frozen_modules`` (pretrained encoders, base models) are rebuilt from the
    config, so they are left out of ``state_dict`` (checkpoints stay small) and keep their live
    values on load; subclasses that save less override :meth:`saved_keys`. Subclasses implement
    ``sample(prompts, num_per_prompt, generator)``.
    """

    frozen_modules: tuple[str, ...] = ()
    main_metric: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_drop_unsaved)
        self.register_load_state_dict_post_hook(_forgive_unsaved)

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.frozen_modules)

    def saved_keys(self) -> Callable[[str], bool]:
        """Which state-dict keys (relative to this module) checkpoints and exports hold: all
        but those of ``frozen_modules``."""
        frozen = self._frozen_prefixes()
        return lambda key: not key.startswith(frozen)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the saved weights in the checkpoint (for FSDP's full state dict, which the
        state-dict hook leaves whole)."""
        if "state_dict" in checkpoint:
            drop_unsaved_keys(self, checkpoint["state_dict"])

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
    with every_weight():
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
    """Load a Lightning ``.ckpt`` (weights only, no pickled code), a ``.safetensors`` file or a
    DeepSpeed checkpoint folder (its float32 weights; needs the deepspeed package)."""
    from genlab.distributed import is_deepspeed_checkpoint

    path = Path(path)
    if is_deepspeed_checkpoint(path):
        state = _deepspeed_fp32_weights(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    elif path.suffix == ".safetensors":
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


def _deepspeed_fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of a DeepSpeed checkpoint folder (ZeRO stage 1, 2 or 3)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{folder} is a DeepSpeed checkpoint folder: reading it needs the deepspeed package "
            "(pip install deepspeed); or load the run's model.safetensors instead"
        ) from err
    return get_fp32_state_dict_from_zero_checkpoint(str(folder))

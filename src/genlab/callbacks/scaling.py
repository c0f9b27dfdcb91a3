"""Batch size and learning rate across processes: the ``scale_lr`` rule and a report of both.

``model.optimizer.lr`` in a config is the rate for one process without gradient accumulation.
With ``scale_lr`` set, :func:`scale_config_lr` multiplies it before the model (and so its
optimisers) is built, by ``k = world_size * accumulate_grad_batches`` (``linear``) or ``sqrt(k)``
(``sqrt``); ``none`` keeps it. :class:`ScalingReport` logs what a run actually trained with.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SCALE_RULES = ("none", "linear", "sqrt")


def lr_scale(rule: str | None, world_size: int, accumulate_grad_batches: int = 1) -> float:
    """The factor ``rule`` gives for ``world_size`` processes, each accumulating that many batches."""
    name = "none" if rule is None or rule is False else str(rule).lower()
    k = max(int(world_size), 1) * max(int(accumulate_grad_batches), 1)
    if name == "none":
        return 1.0
    if name == "linear":
        return float(k)
    if name == "sqrt":
        return math.sqrt(k)
    raise ValueError(f"scale_lr={rule!r}: expected one of {', '.join(SCALE_RULES)}")


def scale_config_lr(cfg: DictConfig, trainer: pl.Trainer, key: str = "model.optimizer.lr") -> float:
    """Apply ``cfg.scale_lr`` to ``cfg.<key>`` for this trainer's processes; returns the factor."""
    rule = cfg.get("scale_lr")
    factor = lr_scale(rule, trainer.world_size, trainer.accumulate_grad_batches)
    if factor == 1.0:
        return factor
    base = OmegaConf.select(cfg, key)
    if base is None:
        raise ValueError(f"scale_lr={rule} needs a learning rate at {key}; this config has none")
    OmegaConf.update(cfg, key, float(base) * factor)
    log.info(
        "scale_lr=%s: %s %g -> %g (x%.4g for %d process(es) x %d accumulated batch(es))",
        rule,
        key,
        float(base),
        float(base) * factor,
        factor,
        trainer.world_size,
        trainer.accumulate_grad_batches,
    )
    return factor


def per_device_batch_size(trainer: pl.Trainer) -> int | None:
    """Batch size of one process's training loader (None when the loader does not say)."""
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if size is None:
        size = getattr(trainer.datamodule, "batch_size", None)
    return int(size) if size is not None else None


class ScalingReport(pl.Callback):
    """At the start of training, log how the run is scaled out.

    ``scaling/world_size``, ``scaling/num_nodes``, ``scaling/per_device_batch_size``,
    ``scaling/accumulate_grad_batches``, ``scaling/effective_batch_size`` (per-device batch x
    world size x accumulation: the samples behind one optimiser step), ``scaling/lr_scale``
    (the factor ``scale_lr`` applied) and ``scaling/lr`` (the first optimiser's base rate, after
    scaling) reach every logger and ``metrics.json``; one line goes to the log.

    Args:
        scale_lr: The run's ``scale_lr`` rule (``none``, ``linear``, ``sqrt``), for the report.
    """

    def __init__(self, scale_lr: str | None = "none") -> None:
        super().__init__()
        lr_scale(scale_lr, 1)  # an unknown rule fails when the callback is built
        self.scale_lr = scale_lr
        self.values: dict[str, float] = {}

    def collect(self, trainer: pl.Trainer) -> dict[str, float]:
        world = trainer.world_size
        accumulate = trainer.accumulate_grad_batches
        values: dict[str, float] = {
            "scaling/world_size": float(world),
            "scaling/num_nodes": float(trainer.num_nodes),
            "scaling/accumulate_grad_batches": float(accumulate),
            "scaling/lr_scale": lr_scale(self.scale_lr, world, accumulate),
        }
        batch = per_device_batch_size(trainer)
        if batch is not None:
            values["scaling/per_device_batch_size"] = float(batch)
            values["scaling/effective_batch_size"] = float(batch * world * accumulate)
        if trainer.optimizers:
            group: dict[str, Any] = trainer.optimizers[0].param_groups[0]
            # schedulers keep the rate they started from in initial_lr (warm-up lowers "lr")
            values["scaling/lr"] = float(group.get("initial_lr", group["lr"]))
        return values

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values = self.collect(trainer)
        # the same on every rank; sync_dist only keeps Lightning's DDP logging contract
        pl_module.log_dict(self.values, on_step=False, on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            v = self.values
            batch = v.get("scaling/per_device_batch_size")
            log.info(
                "scale-out: %d process(es) on %d node(s), batch %s per process x %d accumulated "
                "= %s samples per optimiser step; lr %s (scale_lr=%s, x%.4g)",
                int(v["scaling/world_size"]),
                int(v["scaling/num_nodes"]),
                "?" if batch is None else int(batch),
                int(v["scaling/accumulate_grad_batches"]),
                "?" if batch is None else int(v["scaling/effective_batch_size"]),
                f"{v['scaling/lr']:g}" if "scaling/lr" in v else "?",
                self.scale_lr,
                v["scaling/lr_scale"],
            )

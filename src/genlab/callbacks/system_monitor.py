"""CPU, RAM and GPU usage logging during training."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch import Callback

log = logging.getLogger(__name__)

GIB = float(1024**3)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def describe_devices(trainer: pl.Trainer | None = None) -> str:
    """One line describing the compute in use: GPUs (name, memory) or CPU, plus cores and RAM."""
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    usable = _usable_cpus()
    ram = psutil.virtual_memory().total / GIB
    cores = f"{logical} logical / {physical} physical cores"
    if usable < logical:
        cores += f" ({usable} usable)"
    cpu = f"CPU: {cores}, {ram:.1f} GiB RAM"

    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    if device.type == "cuda":
        ids = trainer.device_ids if trainer is not None else [device.index or 0]
        gpus = []
        for index in ids:
            props = torch.cuda.get_device_properties(index)
            gpus.append(f"cuda:{index} {props.name} ({props.total_memory / GIB:.1f} GiB)")
        accel = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: " + ", ".join(gpus)
    elif device.type == "mps":
        accel = "Apple MPS GPU"
    else:
        accel = f"{device.type.upper()} only"
    parts = [f"Devices: {accel}", cpu]
    if trainer is not None:
        if trainer.num_nodes > 1:
            parts.append(f"{trainer.num_nodes} nodes")
        parts.append(f"strategy={type(trainer.strategy).__name__}, precision={trainer.precision}")
    return "; ".join(parts)


class SystemMonitor(Callback):
    """Log ``system/*`` CPU, RAM and GPU usage to the trainer's loggers every N global steps.

    Logs go straight to ``trainer.loggers`` (global rank 0 only), at the same step axis as
    ``self.log`` metrics, so the cadence does not depend on ``log_every_n_steps`` and works with
    automatic and manual optimisation alike. Metrics: ``system/cpu_percent`` (system-wide),
    ``system/ram_used_gb``, ``system/process_rss_gb`` and, on CUDA,
    ``system/gpu_mem_{allocated,reserved,peak}_gb`` and ``system/gpu_util_percent`` (needs
    pynvml; skipped when unavailable). Sizes are GiB.

    Args:
        every_n_steps: Log when ``trainer.global_step`` enters a new multiple of this.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._process = psutil.Process()
        self._last_bucket: int | None = None
        self._gpu_util_available: bool | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_bucket = None
        psutil.cpu_percent(interval=None)  # prime: the first non-blocking call returns 0.0
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if trainer.is_global_zero:
            log.info(describe_devices(trainer))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        bucket = trainer.global_step // self.every_n_steps
        if bucket == self._last_bucket:
            return
        self._last_bucket = bucket
        metrics = self.collect(trainer.strategy.root_device)
        # same x-axis as LightningModule.log (and Lightning's own LearningRateMonitor)
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def collect(self, device: torch.device | None = None) -> dict[str, float]:
        """Current ``system/*`` metrics; GPU entries only when ``device`` is a CUDA device."""
        metrics = {
            "system/cpu_percent": float(psutil.cpu_percent(interval=None)),
            "system/ram_used_gb": psutil.virtual_memory().used / GIB,
            "system/process_rss_gb": self._process.memory_info().rss / GIB,
        }
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            metrics["system/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(device) / GIB
            metrics["system/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(device) / GIB
            metrics["system/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / GIB
            if self._gpu_util_available is not False:
                try:
                    metrics["system/gpu_util_percent"] = float(torch.cuda.utilization(device))
                    self._gpu_util_available = True
                except Exception:  # no pynvml / NVML, unsupported device: stop trying
                    self._gpu_util_available = False
        return metrics

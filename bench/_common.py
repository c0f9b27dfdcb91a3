"""Pieces the bench scripts share: synthetic batches, a per-step clock and a quiet Trainer.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
import ``_common`` directly.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import Dataset


class RandomGrids(Dataset):
    """Fixed random occupancy grids (about 15 % filled) with captions, the same every epoch."""

    def __init__(self, n: int, r: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.voxels = (torch.rand(n, 1, r, r, r, generator=gen) > 0.85).float()
        self.captions = [f"a shape number {i % 7}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.voxels)

    def __getitem__(self, i: int) -> dict:
        return {"voxels": self.voxels[i], "caption": self.captions[i]}


class StepClock(pl.Callback):
    """Wall time of every training batch on this rank (CUDA-synchronised on a GPU)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def _now(self, trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.starts.append(self._now(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(self._now(trainer))

    def durations(self, skip: int = 0) -> list[float]:
        """Seconds of each batch after the first ``skip`` (warm-up)."""
        return [e - s for s, e in zip(self.starts[skip:], self.ends[skip:], strict=True)]


def median(xs: list[float]) -> float:
    """The middle value (upper median); NaN for no values."""
    return sorted(xs)[len(xs) // 2] if xs else math.nan


def bench_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A Trainer that only trains: no logger, checkpoints, progress bar, summary or validation."""
    options: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(callbacks=callbacks, **(options | kwargs))


GIB = 2**30
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def model_config(name: str, overrides: list[str]) -> DictConfig:
    """``cfg.model`` of ``train.yaml`` with ``model=<name>``, composed as the CLI would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", *overrides])
    return cfg.model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def trainer(
    max_steps: int, device: torch.device, precision: str, callbacks: list[pl.Callback], root: str
) -> pl.Trainer:
    return bench_trainer(
        callbacks,
        max_steps=max_steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        default_root_dir=root,
    )


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "genlab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    for message in (
        r".*does not have many workers.*",
        r".*validation_step.*val_dataloader.*",
        r".*module\(s\) in eval mode.*",
        r".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


class Interleaved(pl.Callback):
    """Times each of our steps and runs one reference step beside it: after ours on even
    steps, before ours on odd ones, so that neither side always follows the other."""

    def __init__(self, device: torch.device, reference: Iterator[float | None]) -> None:
        self.device = device
        self.reference = reference
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self._start = 0.0

    def _reference_step(self) -> None:
        with torch.enable_grad():
            self.theirs.append(next(self.reference))

    def on_train_batch_start(self, *args: Any) -> None:
        if len(self.ours) % 2 == 1:
            self._reference_step()
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        sync(self.device)
        self.ours.append(time.perf_counter() - self._start)
        if len(self.ours) % 2 == 1:
            self._reference_step()


class PeakTimer(pl.Callback):
    """Step times (CUDA-synchronised) and, from the start of training, the peak allocation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.peak: float | None = None
        self._start = 0.0

    def on_train_start(self, *args: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_batch_start(self, *args: Any) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, *args: Any) -> None:
        # before teardown, which may cast frozen weights back to float32
        self.peak = self.read_peak()

    def on_exception(self, *args: Any) -> None:
        self.peak = self.read_peak()

    def read_peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / GIB

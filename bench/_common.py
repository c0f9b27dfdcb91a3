"""Pieces the bench scripts share: synthetic batches, a per-step clock and a quiet Trainer.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
import ``_common`` directly.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
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

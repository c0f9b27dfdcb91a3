"""A PNG of the loss and metric curves per epoch, written at the end of fit."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure


class LossCurves(pl.Callback):
    """Records epoch-level values of metrics matching ``patterns`` and plots them, one panel per pattern."""

    def __init__(self, path: str | Path, patterns: tuple[str, ...] = ("loss", "iou")) -> None:
        self.path = Path(path)
        self.patterns = tuple(patterns)
        self.history: dict[str, dict[int, float]] = defaultdict(dict)

    def _record(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step") or getattr(value, "numel", lambda: 1)() != 1:
                continue
            name = key.removesuffix("_epoch")
            if "/" in name and any(p in name for p in self.patterns):  # stage/metric names only
                self.history[name][trainer.current_epoch] = float(value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            self.plot(self.path)

    def plot(self, path: Path) -> Path:
        fig = Figure(figsize=(5 * len(self.patterns), 4), dpi=110)
        for i, pattern in enumerate(self.patterns, start=1):
            ax = fig.add_subplot(1, len(self.patterns), i)
            for name in sorted(k for k in self.history if re.search(pattern, k)):
                epochs = sorted(self.history[name])
                ax.plot(
                    [e + 1 for e in epochs],
                    [self.history[name][e] for e in epochs],
                    marker=".",
                    label=name,
                )
            ax.set_title(pattern)
            ax.set_xlabel("epoch")
            if pattern == "loss":
                ax.set_yscale("symlog", linthresh=1e-2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path

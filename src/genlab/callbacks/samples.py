"""Write and log sample previews (meshes, images, a PNG grid) during and after training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from genlab.distributed import call_with_full_weights, shards_weights
from genlab.loggers.media import log_image, log_mesh
from genlab.samples import write_samples

log = logging.getLogger(__name__)


class SamplePreviews(pl.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, sample the model for ``prompts``.

    Files go to ``out_dir/epoch_XXX/`` (meshes, one PNG each, ``grid.png``); the grid and the meshes
    are sent to the loggers. Sampling draws from its own seeded generator, so it does not disturb
    the training RNG streams. Only rank 0 samples and writes, except under a strategy that shards
    the weights (FSDP, ZeRO-3): there every rank samples the same prompts and seeds together
    (each gathers the weights it holds a shard of), and rank 0 writes.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prompts: list[str] | None = None,
        every_n_epochs: int = 10,
        num_per_prompt: int = 1,
        seed: int = 0,
        mesh_format: str = "obj",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.prompts = list(prompts) if prompts else None
        self.every_n_epochs = every_n_epochs
        self.num_per_prompt = num_per_prompt
        self.seed = seed
        self.mesh_format = mesh_format
        self._last_written: int | None = None

    def _prompts(self, trainer: pl.Trainer) -> list[str]:
        if self.prompts:
            return self.prompts
        return list(getattr(trainer.datamodule, "sample_prompts", None) or [""])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        completed = trainer.current_epoch + 1
        if self.every_n_epochs > 0 and completed % self.every_n_epochs == 0:
            self.write(trainer, pl_module, completed)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the end of training, before the strategy's teardown (DeepSpeed then moves the module
        # to the CPU and its partitioned weights can no longer be gathered)
        self.write(trainer, pl_module, trainer.current_epoch)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> Path | None:
        """Sample and write the previews of ``epoch``; the grid's path on rank 0, else None."""
        if (
            self._last_written == epoch
            or trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)
            or not (trainer.is_global_zero or shards_weights(trainer.strategy))
        ):
            return None
        self._last_written = epoch
        samples = call_with_full_weights(
            trainer,
            pl_module,
            "sample",
            self._prompts(trainer),
            self.num_per_prompt,
            torch.Generator().manual_seed(self.seed),
        )
        if not trainer.is_global_zero:
            return None
        written, grid_path = write_samples(
            samples, self.out_dir / f"epoch_{epoch:03d}", self.mesh_format
        )
        from PIL import Image

        with Image.open(grid_path) as grid:
            log_image(trainer.loggers, "samples/grid", grid.copy(), trainer.global_step)
        for w in written:
            if w.mesh_path is not None:
                log_mesh(
                    trainer.loggers,
                    f"samples/{w.sample.stem}",
                    w.sample.mesh,
                    w.mesh_path,
                    trainer.global_step,
                )
        empty = sum(w.mesh_path is None and w.sample.image is None for w in written)
        log.info(
            "samples of epoch %d written to %s%s",
            epoch,
            grid_path.parent,
            f" ({empty} without a surface)" if empty else "",
        )
        return grid_path

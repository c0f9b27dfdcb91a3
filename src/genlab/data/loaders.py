"""The batching every genlab datamodule shares: one seeded, checkpointed shuffle order."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class SeededDataModule(pl.LightningDataModule):
    """A LightningDataModule whose training order is reproducible and resumable.

    The training loader shuffles with one ``torch.Generator`` owned by the datamodule; its
    state is what ``state_dict`` saves, so a run resumed from a checkpoint (``ckpt_path=last``)
    draws exactly the batches the interrupted run would have drawn. Validation and test
    loaders never shuffle. Subclasses set ``batch_size`` and ``num_workers`` and implement
    :meth:`split_dataset`.
    """

    batch_size: int = 1
    num_workers: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._train_generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)

    def split_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def make_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """A loader over ``dataset``: shuffled by the checkpointed generator when ``shuffle``."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # a fixed generator for the ordered loaders: iterating them never draws from the
            # global RNG, so validation does not shift the training randomness
            generator=self._train_generator if shuffle else torch.Generator().manual_seed(0),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.split_dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.split_dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.make_loader(self.split_dataset("test"), shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_generator.set_state(state_dict["train_generator"])

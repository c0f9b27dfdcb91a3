"""LightningDataModule for voxel grids with captions (synthetic shapes, mesh folders)."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from genlab.data.loaders import SeededDataModule
from genlab.data.splits import stratified_split
from genlab.data.validation import Problem, ValidationReport, check_bad_file_policy
from genlab.data.voxel_dataset import VoxelCaptionDataset, VoxelSet

log = logging.getLogger(__name__)


class VoxelSource(Protocol):
    """What a voxel data source provides: ``prepare()`` (cache, one process), ``load()`` and
    ``validate()`` (counts and bad files, without raising for them)."""

    def prepare(self) -> None: ...

    def load(self) -> VoxelSet: ...

    def validate(self) -> ValidationReport: ...


class VoxelDataModule(SeededDataModule):
    """Reads a voxel source, splits it (the source's own train/test split when it has one) and batches it.

    The training order is drawn from the module's own generator (its state is checkpointed), so a
    resumed run sees the same batches as an uninterrupted one.

    ``on_bad_file`` (``"error"`` or ``"skip"``; None keeps the source's own) is handed to the
    source; ``skipped`` lists what the source left out.
    """

    def __init__(
        self,
        dataset: VoxelSource,
        voxel_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        max_samples: int | None = None,
        sample_prompts: list[str] | None = None,
        on_bad_file: str | None = None,
    ) -> None:
        super().__init__()
        self.source = dataset
        self.voxel_size = voxel_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self._sample_prompts = list(sample_prompts) if sample_prompts else None
        self.data: VoxelSet | None = None
        self.splits: dict[str, np.ndarray] = {}
        if on_bad_file is not None:
            self.on_bad_file = on_bad_file

    @property
    def on_bad_file(self) -> str:
        """The source's bad-file policy: ``"error"`` or ``"skip"``."""
        return getattr(self.source, "on_bad_file", "error")

    @on_bad_file.setter
    def on_bad_file(self, value: str) -> None:
        self.source.on_bad_file = check_bad_file_policy(value)  # type: ignore[attr-defined]

    @property
    def skipped(self) -> list[Problem]:
        """Files the source left out (``on_bad_file="skip"``), each with its reason."""
        return list(getattr(self.source, "skipped", []))

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        self._load()
        if len(self.splits["train"]) == 0:
            raise ValueError(_EMPTY_TRAIN)

    def validate(self) -> ValidationReport:
        """The source's report with the split sizes this module will use (train/val/test).

        Does not raise for bad files. With ``on_bad_file="error"`` and bad files the data is
        not loaded and the splits stay those the source reports.
        """
        report = self.source.validate()
        if not report.ok and self.on_bad_file == "error":
            return report
        if self.data is None:
            try:
                data = self.source.load()
            except ValueError as err:  # e.g. every file bad with skip: nothing to split
                report.add(report.dataset, str(err))
                return report
            self._use(data)
        report.splits = {k: len(v) for k, v in self.splits.items()}
        if len(self.splits["train"]) == 0:
            report.add(report.dataset, _EMPTY_TRAIN)
        return report

    def _load(self) -> None:
        """Read the source and split it (once)."""
        if self.data is None:
            self._use(self.source.load())

    def _use(self, data: VoxelSet) -> None:
        if data.resolution != self.voxel_size:
            raise ValueError(
                f"data set grids are {data.resolution}^3 but voxel_size={self.voxel_size}"
            )
        self.splits = self._split(data)
        self.data = data
        sizes = {k: len(v) for k, v in self.splits.items()}
        log.info(
            "voxel data: %d items, %d classes, splits %s",
            len(data.voxels),
            len(data.class_names),
            sizes,
        )

    def _split(self, data: VoxelSet) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.split_seed)
        keep = np.arange(len(data.voxels))
        if self.max_samples is not None and self.max_samples < len(keep):
            keep = np.sort(rng.permutation(keep)[: self.max_samples])
        if data.splits is None:
            parts = stratified_split(
                data.labels[keep], self.val_fraction, self.test_fraction, self.split_seed
            )
            return {k: keep[v] for k, v in parts.items()}
        fixed = np.asarray(data.splits)[keep]
        train_pool, test = keep[fixed == "train"], keep[fixed == "test"]
        parts = stratified_split(data.labels[train_pool], self.val_fraction, 0.0, self.split_seed)
        return {"train": train_pool[parts["train"]], "val": train_pool[parts["val"]], "test": test}

    @property
    def class_names(self) -> list[str]:
        if self.data is None:
            self.setup()
        assert self.data is not None
        return self.data.class_names

    @property
    def sample_prompts(self) -> list[str]:
        """Prompts for sample previews: the configured ones, else "a <class>" per class."""
        if self._sample_prompts:
            return self._sample_prompts
        return [f"{_article(c)} {c.replace('_', ' ')}" for c in self.class_names]

    def split_dataset(self, split: str) -> VoxelCaptionDataset:
        assert self.data is not None, "call setup() first"
        return VoxelCaptionDataset(self.data, self.splits[split])


_EMPTY_TRAIN = "the training split is empty: add data or lower val_fraction/test_fraction"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"

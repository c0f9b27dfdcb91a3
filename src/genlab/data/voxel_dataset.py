"""In-memory voxel datasets shared by the voxel datamodules, plus their on-disk cache format."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class VoxelSet:
    """Occupancy grids with their captions and class labels (and, optionally, a fixed split)."""

    voxels: np.ndarray  # (N, R, R, R) bool
    captions: list[str]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    splits: list[str] | None = None  # "train" / "test" per item when the source defines them
    sources: list[str] = field(default_factory=list)  # file or generator id per item

    def __post_init__(self) -> None:
        n = len(self.voxels)
        if self.voxels.ndim != 4 or len({*self.voxels.shape[1:]}) != 1:
            raise ValueError(f"voxels must have shape (N, R, R, R), got {self.voxels.shape}")
        if len(self.captions) != n or len(self.labels) != n:
            raise ValueError(
                f"{n} grids but {len(self.captions)} captions and {len(self.labels)} labels"
            )
        if n == 0:
            raise ValueError("the voxel set is empty")

    @property
    def resolution(self) -> int:
        return int(self.voxels.shape[1])

    def save(self, path: Path) -> None:
        """Write atomically as a compressed npz (bit-packed grids)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "captions": self.captions,
            "class_names": self.class_names,
            "splits": self.splits,
            "sources": self.sources,
            "shape": list(self.voxels.shape),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez_compressed(
                tmp,
                packed=np.packbits(self.voxels.astype(bool).reshape(len(self.voxels), -1), axis=1),
                labels=self.labels.astype(np.int64),
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> VoxelSet:
        with np.load(path) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            shape = tuple(meta["shape"])
            flat = np.unpackbits(npz["packed"], axis=1, count=int(np.prod(shape[1:])))
            voxels = flat.reshape(shape).astype(bool)
            labels = npz["labels"]
        return cls(
            voxels, meta["captions"], labels, meta["class_names"], meta["splits"], meta["sources"]
        )


def cache_key(params: dict) -> str:
    """Stable short hash of the parameters that determine a cached data set."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


class VoxelCaptionDataset(Dataset):
    """Items ``{"voxels": (1,R,R,R) float, "caption": str, "label": int, "class_name": str}``."""

    def __init__(self, data: VoxelSet, indices: np.ndarray | None = None) -> None:
        self.data = data
        self.indices = np.arange(len(data.voxels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        label = int(self.data.labels[j])
        return {
            "voxels": torch.from_numpy(self.data.voxels[j]).float().unsqueeze(0),
            "caption": self.data.captions[j],
            "label": label,
            "class_name": self.data.class_names[label],
        }


class VoxelFile:
    """Config-facing source of a prepared voxel file (``genlab.pipeline`` prepare writes it)."""

    on_bad_file = "error"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.skipped: list = []

    def prepare(self) -> None:
        self._check()

    def load(self) -> VoxelSet:
        self._check()
        try:
            return VoxelSet.load(self.path)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{self.path}: not a readable voxel file ({err})") from err

    def validate(self):
        """Counts of the prepared file (its problems were reported when it was prepared)."""
        from genlab.data.validation import ValidationReport

        data = self.load()
        report = ValidationReport(str(self.path))
        report.count("shapes", len(data.voxels))
        report.count("classes", len(data.class_names))
        return report

    def _check(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no prepared voxel file (run `dvc repro prepare` first)"
            )

"""Deterministic, stratified train/val/test splits."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Split indices per class with a seeded shuffle; every class with >= 3 items lands in all splits."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = _count(len(idx), val_fraction)
        n_test = _count(len(idx), test_fraction)
        out["val"] += idx[:n_val].tolist()
        out["test"] += idx[n_val : n_val + n_test].tolist()
        out["train"] += idx[n_val + n_test :].tolist()
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _count(n: int, fraction: float) -> int:
    if fraction == 0:
        return 0
    return max(1, round(n * fraction)) if n >= 3 else 0

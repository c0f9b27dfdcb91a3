"""Labelled voxel shapes made in the project (no download): spheres, boxes, cylinders, cones, tori.

Each shape has a random size and position inside the unit cube; its caption is built from those
attributes ("a large torus on the left"). Deterministic by seed and cached on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from genlab.data.validation import Problem, ValidationReport
from genlab.data.voxel_dataset import VoxelSet, cache_key
from genlab.geometry.voxelize import voxel_centers

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SIZE_WORDS = ((0.55, "small"), (0.75, "medium"), (1.01, "large"))  # by relative size
SIDE_WORDS = {-1: "on the left", 0: "", 1: "on the right"}


def _sphere(p: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.norm(p, axis=-1) - 0.5 * s


def _box(p: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    half = 0.5 * s * rng.uniform(0.6, 1.0, size=3)
    q = np.abs(_rotate_z(p, rng.uniform(0, np.pi / 2))) - half
    return np.max(q, axis=-1)


def _cylinder(p: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    r, h = 0.5 * s * rng.uniform(0.5, 0.8), 0.5 * s
    return np.maximum(np.linalg.norm(p[..., :2], axis=-1) - r, np.abs(p[..., 2]) - h)


def _cone(p: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    r, h = 0.5 * s * rng.uniform(0.7, 1.0), 0.5 * s  # apex at +h, base radius r at -h
    radius_at_z = r * (h - p[..., 2]) / (2 * h)
    return np.maximum(np.linalg.norm(p[..., :2], axis=-1) - radius_at_z, np.abs(p[..., 2]) - h)


def _torus(p: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    tube = 0.5 * s * rng.uniform(0.22, 0.3)
    ring = 0.5 * s - tube
    q = np.stack([np.linalg.norm(p[..., :2], axis=-1) - ring, p[..., 2]], axis=-1)
    return np.linalg.norm(q, axis=-1) - tube


def _rotate_z(p: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    x, y = p[..., 0], p[..., 1]
    return np.stack([c * x - s * y, s * x + c * y, p[..., 2]], axis=-1)


SHAPES: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "sphere": _sphere,
    "box": _box,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
}


def make_shape(name: str, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One random instance of shape ``name``: (occupancy grid (R,R,R) bool, caption)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape '{name}', expected one of {sorted(SHAPES)}")
    rel = rng.uniform(0.5, 1.0)  # size relative to the largest that fits beside an offset
    side = int(rng.integers(-1, 2))
    max_size = 0.9 - 0.3 * abs(side)
    size = rel * max_size
    offset = np.array([0.22 * side, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)])
    sdf = SHAPES[name](voxel_centers(resolution) - offset, size, rng)
    grid = sdf <= 0
    if not grid.any():  # too small for the grid: mark the voxel at the centre
        grid[tuple(np.clip(((offset + 0.5) * resolution).astype(int), 0, resolution - 1))] = True
    size_word = next(word for bound, word in SIZE_WORDS if rel < bound)
    caption = " ".join(w for w in ("a", size_word, name, SIDE_WORDS[side]) if w)
    return grid, caption


def generate(classes: Sequence[str], num_per_class: int, resolution: int, seed: int) -> VoxelSet:
    """Make ``num_per_class`` shapes of each class, interleaved, deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    voxels = np.zeros(
        (len(classes) * num_per_class, resolution, resolution, resolution), dtype=bool
    )
    captions, labels, sources = [], [], []
    order = [(i, c) for i in range(num_per_class) for c in range(len(classes))]
    for n, (i, c) in enumerate(tqdm(order, desc="synthetic shapes", unit="shape", leave=False)):
        voxels[n], caption = make_shape(classes[c], resolution, rng)
        captions.append(caption)
        labels.append(c)
        sources.append(f"synthetic:{classes[c]}:{i}")
    return VoxelSet(voxels, captions, np.asarray(labels), list(classes), None, sources)


class SyntheticShapes:
    """Config-facing source of the synthetic data set; ``load()`` generates or reads the cache.

    Generated data has no bad files: ``on_bad_file`` is ``"error"`` and ``skipped`` stays empty.
    """

    on_bad_file: str = "error"

    def __init__(
        self,
        voxel_size: int = 32,
        num_per_class: int = 120,
        classes: Sequence[str] = ("sphere", "box", "cylinder", "cone", "torus"),
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        unknown = [c for c in classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape classes {unknown}, expected some of {sorted(SHAPES)}")
        if num_per_class < 1:
            raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
        self.params = {
            "voxel_size": int(voxel_size),
            "num_per_class": int(num_per_class),
            "classes": list(classes),
            "seed": int(seed),
            "version": CACHE_VERSION,
        }
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.skipped: list[Problem] = []

    @property
    def cache_path(self) -> Path | None:
        return self.cache_dir / f"shapes_{cache_key(self.params)}.npz" if self.cache_dir else None

    def prepare(self) -> None:
        """Generate and cache once (call on one process only)."""
        path = self.cache_path
        if path is not None and not path.exists():
            data = self._generate()
            data.save(path)
            log.info("cached %d synthetic shapes at %s", len(data.voxels), path)

    def load(self) -> VoxelSet:
        path = self.cache_path
        if path is not None and path.exists():
            return VoxelSet.load(path)
        data = self._generate()
        if path is not None:
            data.save(path)
        return data

    def validate(self) -> ValidationReport:
        """Counts per class (nothing is generated; generated shapes have no problems, no fixed split)."""
        p = self.params
        report = ValidationReport("synthetic_shapes")
        report.count("shapes", len(p["classes"]) * p["num_per_class"])
        report.count("classes", len(p["classes"]))
        for name in p["classes"]:
            report.count(f"{name} shapes", p["num_per_class"])
        return report

    def _generate(self) -> VoxelSet:
        p = self.params
        return generate(p["classes"], p["num_per_class"], p["voxel_size"], p["seed"])

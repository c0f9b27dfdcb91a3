"""Voxel data from a folder of meshes in the ModelNet/ShapeNet layout: ``<root>/<category>/{train,test}/*``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from genlab.data.meshes import MESH_EXTENSIONS, MeshReadError, load_mesh, normalize_to_unit_cube
from genlab.data.voxel_dataset import VoxelSet, cache_key
from genlab.geometry.voxelize import voxelize_mesh

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLIT_FOLDERS = ("train", "test")


def caption_for(category: str) -> str:
    """``night_stand`` -> "a night stand"; ``armchair`` -> "an armchair"."""
    words = category.replace("_", " ").strip()
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def scan(root: Path, categories: list[str] | None = None) -> list[tuple[Path, str, str]]:
    """(file, category, split) for every mesh; files directly under a category count as train."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.dataset.root={root}: no such folder")
    found_categories = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    wanted = categories or found_categories
    missing = sorted(set(wanted) - set(found_categories))
    if missing:
        raise FileNotFoundError(
            f"{root}: categories {missing} not found (present: {found_categories})"
        )
    items = []
    for category in wanted:
        for path in sorted((root / category).rglob("*")):
            if path.suffix.lower() in MESH_EXTENSIONS and path.is_file():
                rel = path.relative_to(root / category).parts
                split = rel[0] if len(rel) > 1 and rel[0] in SPLIT_FOLDERS else "train"
                items.append((path, category, split))
    if not items:
        raise FileNotFoundError(
            f"{root}: no mesh files ({', '.join(MESH_EXTENSIONS)}) in categories {wanted}"
        )
    return items


def voxelize_file(path: Path, resolution: int) -> np.ndarray:
    """Load, centre and scale into the unit cube (one voxel of margin), and solid-voxelise one mesh."""
    mesh = load_mesh(path)
    try:
        mesh = normalize_to_unit_cube(mesh, margin=1.0 / resolution)
    except ValueError as err:
        raise MeshReadError(path, str(err)) from err
    grid = voxelize_mesh(mesh, resolution, fill=True)
    if not grid.any():
        raise MeshReadError(path, "voxelises to an empty grid")
    return grid


class MeshFolderVoxels:
    """Config-facing source: voxelises every mesh once (with a progress bar) and caches the grids.

    The cache key covers file names, sizes and modification times, so edited data is re-voxelised.
    ``on_bad_file="skip"`` logs and lists unreadable meshes instead of stopping.
    """

    def __init__(
        self,
        root: str | Path,
        voxel_size: int = 32,
        categories: list[str] | None = None,
        cache_dir: str | Path | None = None,
        on_bad_file: str = "error",
    ) -> None:
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.root = Path(root).expanduser()
        self.voxel_size = int(voxel_size)
        self.categories = list(categories) if categories else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.on_bad_file = on_bad_file
        self.skipped: list[tuple[str, str]] = []

    def _cache_path(self, items: list[tuple[Path, str, str]]) -> Path | None:
        if self.cache_dir is None:
            return None
        files = [
            (str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns)
            for p, _, _ in items
        ]
        params = {
            "root": str(self.root.resolve()),
            "files": files,
            "voxel_size": self.voxel_size,
            "on_bad_file": self.on_bad_file,
            "version": CACHE_VERSION,
        }
        return self.cache_dir / f"meshes_{cache_key(params)}.npz"

    def prepare(self) -> None:
        self.load()

    def load(self) -> VoxelSet:
        items = scan(self.root, self.categories)
        path = self._cache_path(items)
        if path is not None and path.exists():
            return VoxelSet.load(path)
        data = self._voxelize(items)
        if path is not None:
            data.save(path)
            log.info("cached %d voxelised meshes at %s", len(data.voxels), path)
        return data

    def _voxelize(self, items: list[tuple[Path, str, str]]) -> VoxelSet:
        class_names = sorted({c for _, c, _ in items})
        grids, captions, labels, splits, sources = [], [], [], [], []
        self.skipped = []
        for path, category, split in tqdm(items, desc=f"voxelising {self.root.name}", unit="mesh"):
            try:
                grids.append(voxelize_file(path, self.voxel_size))
            except MeshReadError as err:
                if self.on_bad_file == "error":
                    raise
                log.warning("skipping %s", err)
                self.skipped.append((str(path), str(err)))
                continue
            captions.append(caption_for(category))
            labels.append(class_names.index(category))
            splits.append(split)
            sources.append(str(path.relative_to(self.root)))
        if not grids:
            raise ValueError(
                f"{self.root}: every mesh was unreadable ({len(self.skipped)} skipped)"
            )
        if self.skipped:
            log.warning(
                "%d of %d meshes skipped (data.dataset.on_bad_file=skip)",
                len(self.skipped),
                len(items),
            )
        return VoxelSet(np.stack(grids), captions, np.asarray(labels), class_names, splits, sources)

"""Captioned (and optionally styled) meshes for text + point-cloud -> voxels/mesh models (otuken3d).

Two folder layouts (``layout="auto"`` picks ``objaverse`` when ``<root>/meshes`` exists)::

    mesh_folder:  <root>/<name>.obj|.ply|.off|.stl|.glb|.gltf    one mesh per object
                  <root>/captions.csv    object_id (or file_name / file),caption[,style]

    objaverse:    <root>/meshes/<object_id>.<ext>                one mesh per object
                  <root>/points/<object_id>.npy|.ply              optional surface points
                  <root>/captions.csv    object_id,caption[,style]
                  or <root>/metadata.json  {"objects": [{"object_id", "caption", "style"}]}
                  (a metadata.json without captions, e.g. image links, is not used)

The object id is the mesh file's stem; a ``file_name``/``file`` column names the mesh file
(its stem is the id). All text files are read as UTF-8 (a BOM is fine): captions and styles
come out of the batches exactly as written (Turkish letters included); a file in another
encoding (e.g. Windows-1254) is reported with its name and the advice to save it as UTF-8.

Batches of ``B`` objects:

- ``object_id``, ``text`` (caption), ``style_text`` (``""`` where the row has no style):
  ``list[str]``;
- ``points``: float32 ``(B, num_points, 3)`` surface points, the model's input;
- ``target_points``: float32 ``(B, num_points, 3)``: the same points without jitter (equal to
  ``points`` outside training or with ``jitter=0``), a clean Chamfer target;
- ``voxels``: float32 ``(B, 1, S, S, S)`` solid occupancy at ``voxel_size`` (the largest
  size the model grows to).

Frame and units: every mesh is centred (bounding box) and scaled into genlab's unit cube
``[-0.5, 0.5]^3`` with one voxel of margin (``normalize=True``; the same transform is applied
to stored points), the frame of :mod:`genlab.geometry.voxelize`; so points and voxels line up.
Points come from ``points/<id>`` when present (resampled to ``num_points``), else from the
mesh surface (area-weighted, seeded by the object id). Points and the packed voxel grid are
computed once per object and cached as ``.npz`` under ``cache_dir`` (never in the data
folder; without a cache dir they are recomputed on every read).

Training augmentation (``augment``, training split only), world z is up:

- ``rotation_deg``: a rotation about the z axis by an angle uniform in ``[-d, d]`` degrees;
- ``scale``: ``[lo, hi]``, one isotropic factor uniform in that range;
- ``jitter``: standard deviation of Gaussian noise added to ``points`` only, in unit-cube
  units (the cube's edge is 1: ``0.1`` is a tenth of the object's size, about 6 voxels at
  64^3, which blurs detail; ``0.005``-``0.01`` is typical for surface points);
- ``voxels`` (default true): the same rotation and scale are applied to the voxel target
  (``torch.nn.functional.grid_sample``, nearest) so that points and voxels stay aligned.
  With ``voxels: false`` the voxel targets stay unaugmented, and only the points move; do
  that only when the model does not compare the two.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genlab.data.captions import (
    CaptionError,
    read_caption_records_csv,
    read_caption_records_json,
)
from genlab.data.errors import DataFileError
from genlab.data.loaders import SeededDataModule
from genlab.data.meshes import MESH_EXTENSIONS, MeshReadError, load_mesh, normalize_to_unit_cube
from genlab.data.point_clouds import POINT_CLOUD_EXTENSIONS, read_point_cloud, resample
from genlab.data.splits import stratified_split
from genlab.data.validation import Problem, ValidationReport, check_bad_file_policy
from genlab.data.voxel_dataset import cache_key
from genlab.geometry.surface import sample_surface
from genlab.geometry.voxelize import voxelize_mesh

__all__ = [
    "CaptionedMeshDataModule",
    "CaptionedMeshDataset",
    "CaptionedObject",
    "PointVoxelAugmentation",
    "SyntheticCaptionedMeshDataModule",
    "prepare_object",
]

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("auto", "mesh_folder", "objaverse")
CACHE_VERSION = 1
_NUM_SAMPLE_PROMPTS = 4


@dataclass(frozen=True)
class CaptionedObject:
    """One object: its mesh, optional stored points, caption and style (``""`` if none)."""

    object_id: str
    mesh: Path
    caption: str
    style: str = ""
    points: Path | None = None


# --------------------------------------------------------------------------------------------
# Per-object geometry (points + voxels), cached
# --------------------------------------------------------------------------------------------


def _seed(object_id: str) -> int:
    return int.from_bytes(hashlib.sha1(object_id.encode("utf-8")).digest()[:8], "little")


def prepare_object(
    obj: CaptionedObject, num_points: int, voxel_size: int, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(points float32 (num_points, 3), voxels bool (S, S, S))`` of one object, in the unit cube.

    Raises :class:`~genlab.data.errors.DataFileError` (naming the file) for unreadable
    meshes or points, degenerate meshes and meshes that voxelise to nothing.
    """
    mesh = load_mesh(obj.mesh)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if normalize:
        try:
            fitted = normalize_to_unit_cube(mesh, margin=1.0 / voxel_size)
        except ValueError as err:
            raise MeshReadError(obj.mesh, str(err)) from err
        # the affine map that normalize_to_unit_cube applied, to move stored points along
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        centre = (lo + hi) / 2.0
        factor = (1.0 - 2.0 / voxel_size) / float((hi - lo).max())
        mesh = fitted
    else:
        centre, factor = np.zeros(3), 1.0
    grid = voxelize_mesh(mesh, voxel_size, fill=True)
    if not grid.any():
        raise MeshReadError(obj.mesh, f"voxelises to an empty grid at {voxel_size}^3")
    rng = np.random.default_rng(_seed(obj.object_id))
    if obj.points is not None:
        stored, _ = read_point_cloud(obj.points)
        points, _ = resample(stored[:, :3], num_points, "random", rng=rng)
        points = (points - centre) * factor
    else:
        try:
            points, _ = sample_surface(mesh, num_points, seed=int(rng.integers(2**31)))
        except ValueError as err:
            raise MeshReadError(obj.mesh, str(err)) from err
    return np.ascontiguousarray(points, dtype=np.float32), grid


class _GeometryCache:
    """``prepare_object`` results as ``<cache_dir>/<id>-<key>.npz`` (voxels bit-packed)."""

    def __init__(
        self, cache_dir: Path | None, num_points: int, voxel_size: int, normalize: bool
    ) -> None:
        self.cache_dir = cache_dir
        self.num_points = num_points
        self.voxel_size = voxel_size
        self.normalize = normalize

    def path(self, obj: CaptionedObject) -> Path | None:
        if self.cache_dir is None:
            return None
        sources = {}
        for name, source in (("mesh", obj.mesh), ("points", obj.points)):
            if source is not None:
                stat = source.stat()
                sources[name] = [str(source.resolve()), stat.st_size, stat.st_mtime_ns]
        key = cache_key(
            {
                **sources,
                "num_points": self.num_points,
                "voxel_size": self.voxel_size,
                "normalize": self.normalize,
                "version": CACHE_VERSION,
            }
        )
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in obj.object_id)
        return self.cache_dir / f"{safe[:80]}-{key}.npz"

    def get(self, obj: CaptionedObject) -> tuple[np.ndarray, np.ndarray]:
        path = self.path(obj)
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as data:
                size = int(data["voxel_size"])
                bits = np.unpackbits(data["voxels"], count=size**3)
                return data["points"], bits.reshape(size, size, size).astype(bool)
        points, grid = prepare_object(obj, self.num_points, self.voxel_size, self.normalize)
        if path is not None:
            _save_npz_atomic(
                path,
                points=points,
                voxels=np.packbits(grid.reshape(-1)),
                voxel_size=np.int64(self.voxel_size),
            )
        return points, grid


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


@dataclass
class PointVoxelAugmentation:
    """Rotation about z, isotropic scale and point jitter (units: the unit cube; module docstring)."""

    rotation_deg: float = 0.0
    scale: Sequence[float] = (1.0, 1.0)
    jitter: float = 0.0
    voxels: bool = True

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment.scale must be [lo, hi] with 0 < lo <= hi, got {self.scale}")
        if self.rotation_deg < 0 or self.jitter < 0:
            raise ValueError("augment.rotation_deg and augment.jitter must be >= 0")

    @property
    def active(self) -> bool:
        return self.rotation_deg > 0 or tuple(self.scale) != (1.0, 1.0) or self.jitter > 0

    def matrix(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random ``(3, 3)`` map ``s * R_z(angle)`` applied as ``points @ M.T``."""
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        angle = math.radians(self.rotation_deg) * (2.0 * float(u[0]) - 1.0)
        lo, hi = float(self.scale[0]), float(self.scale[1])
        factor = lo + (hi - lo) * float(u[1])
        c, s = math.cos(angle), math.sin(angle)
        rotation = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
        return factor * torch.tensor(rotation, dtype=torch.float64)

    def __call__(
        self, points: torch.Tensor, voxels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(jittered points, clean transformed points, voxels)`` for one object."""
        m = self.matrix(generator)
        clean = (points.double() @ m.T).float()
        if self.voxels:
            voxels = transform_voxels(voxels, m)
        noisy = clean
        if self.jitter > 0:
            noise = torch.randn(clean.shape, generator=generator) * self.jitter
            noisy = clean + noise
        return noisy, clean, voxels


def transform_voxels(voxels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Occupancy ``(1, S, S, S)`` of the shape mapped by ``x -> matrix @ x`` (nearest sampling).

    The grid spans ``[-0.5, 0.5]^3`` with ``voxels[0, i, j, k]`` at ``(x, y, z)``; the output
    voxel at ``p`` takes the value of the input at ``matrix^-1 p`` (empty outside the grid).
    """
    inverse = torch.linalg.inv(matrix.double())
    # grid_sample's coordinates are (x, y, z) = (last, middle, first) tensor axis = our (z, y, x)
    flip = torch.eye(3, dtype=torch.float64).flip(0)
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = flip @ inverse @ flip
    grid = F.affine_grid(theta.float(), [1, 1, *voxels.shape[-3:]], align_corners=False)
    out = F.grid_sample(
        voxels[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return out[0]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class CaptionedMeshDataset(Dataset):
    """Items of the batch keys in the module docstring (without the batch dimension)."""

    def __init__(
        self,
        objects: Sequence[CaptionedObject],
        cache: _GeometryCache,
        augment: PointVoxelAugmentation | None = None,
    ) -> None:
        self.objects = list(objects)
        self.cache = cache
        self.augment = augment if augment is not None and augment.active else None

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        obj = self.objects[index]
        points_np, grid = self.cache.get(obj)
        points = torch.from_numpy(np.array(points_np, dtype=np.float32))
        voxels = torch.from_numpy(grid).float()[None]
        target = points
        if self.augment is not None:
            points, target, voxels = self.augment(points, voxels)
        return {
            "object_id": obj.object_id,
            "text": obj.caption,
            "style_text": obj.style,
            "points": points,
            "target_points": target,
            "voxels": voxels,
        }


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class CaptionedMeshDataModule(SeededDataModule):
    """Reads, validates, splits and batches captioned meshes (module docstring).

    ``on_bad_file="skip"`` leaves objects with problems out and lists them in
    :attr:`skipped` (path = object id); ``"error"`` stops with every problem listed. Splits
    are seeded (``split_seed``); the training order comes from the module's checkpointed
    generator (``state_dict``), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        layout: str = "auto",
        num_points: int = 2048,
        voxel_size: int = 64,
        normalize: bool = True,
        augment: Mapping[str, Any] | PointVoxelAugmentation | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_file: str = "error",
        cache_dir: str | os.PathLike[str] | None = None,
        sample_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if int(num_points) < 1 or int(voxel_size) < 2:
            raise ValueError(
                f"need num_points >= 1 and voxel_size >= 2, got {num_points}, {voxel_size}"
            )
        self.root = Path(root).expanduser() if root is not None else None
        self.layout = layout
        self.num_points = int(num_points)
        self.voxel_size = int(voxel_size)
        self.normalize = bool(normalize)
        if augment is None or isinstance(augment, PointVoxelAugmentation):
            self.augment = augment
        else:
            self.augment = PointVoxelAugmentation(**dict(augment))
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_file = check_bad_file_policy(on_bad_file)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._sample_prompts = list(sample_prompts) if sample_prompts else None
        self.report: ValidationReport | None = None
        self.objects: list[CaptionedObject] = []
        self.skipped: list[Problem] = []
        self.splits: dict[str, list[CaptionedObject]] = {}

    # ---------------------------------------------------------------------------- scanning

    def _data_root(self) -> Path:
        if self.root is None:
            raise ValueError("data.root is not set")
        return self.root

    def _check_cache_dir(self, root: Path) -> None:
        if self.cache_dir is not None and self.cache_dir.resolve().is_relative_to(root.resolve()):
            raise ValueError(
                f"cache_dir {self.cache_dir} is inside the data folder {root}; "
                "caches must not be written into the data"
            )

    def resolved_layout(self) -> str:
        root = self._data_root()
        if self.layout != "auto":
            return self.layout
        return "objaverse" if (root / "meshes").is_dir() else "mesh_folder"

    def _geometry_cache(self) -> _GeometryCache:
        folder = None
        if self.cache_dir is not None:
            folder = self.cache_dir / "captioned_meshes"
        return _GeometryCache(folder, self.num_points, self.voxel_size, self.normalize)

    def validate(self) -> ValidationReport:
        """Scan the folder, read captions, build (and cache) every object's points and voxels.

        Fills :attr:`objects` and :attr:`skipped` and returns the report; bad data is
        reported, not raised (a missing folder raises ``FileNotFoundError``).
        """
        root = self._data_root()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={root}: no such folder")
        self._check_cache_dir(root)
        layout = self.resolved_layout()
        report = ValidationReport(str(root))
        bad: dict[str, list[str]] = {}
        meshes = _files_by_stem(root / "meshes" if layout == "objaverse" else root, MESH_EXTENSIONS)
        points = (
            _files_by_stem(root / "points", POINT_CLOUD_EXTENSIONS) if layout == "objaverse" else {}
        )
        captions, captions_file = self._read_captions(root, layout, report)
        ids = sorted(meshes)
        report.count("objects", len(ids))
        report.count("meshes", sum(len(v) for v in meshes.values()))
        report.count("point clouds", sum(len(v) for v in points.values()))
        report.count("captions", len(captions or {}))
        report.count("styles", sum(1 for r in (captions or {}).values() if r.get("style")))

        def flag(object_id: str, path: Path | str, reason: str) -> None:
            report.add(path, reason)
            bad.setdefault(object_id, []).append(f"{Path(path).name}: {reason}")

        for object_id, files in meshes.items():
            if len(files) > 1:
                also = ", ".join(p.name for p in files[1:])
                flag(object_id, files[0], f"duplicate object id {object_id!r} (also {also})")
        if captions is not None:
            for object_id in sorted(set(captions) - set(meshes)):
                report.add(captions_file, f"caption for unknown object {object_id!r}")
        candidates = []
        for object_id in ids:
            if captions is None:
                bad.setdefault(object_id, []).append(f"{captions_file.name} is unreadable")
            elif object_id not in captions:
                flag(object_id, captions_file, f"no caption for object {object_id!r}")
            if object_id in bad:
                continue
            record = captions[object_id]
            candidates.append(
                CaptionedObject(
                    object_id,
                    meshes[object_id][0],
                    record["caption"],
                    record.get("style", ""),
                    points.get(object_id, [None])[0],
                )
            )
        cache = self._geometry_cache()
        usable = []
        for obj in candidates:
            try:
                cache.get(obj)
            except DataFileError as err:
                report.add_error(err)
                bad.setdefault(obj.object_id, []).append(f"{Path(err.path).name}: {err.problem}")
            else:
                usable.append(obj)
        self.objects = usable
        self.skipped = [Problem(i, "; ".join(bad[i])) for i in sorted(bad)]
        parts = stratified_split(
            np.zeros(len(usable), dtype=np.int64),
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        self._split_index = parts
        for name, index in parts.items():
            report.split(name, len(index))
        self.report = report
        return report

    def _read_captions(
        self, root: Path, layout: str, report: ValidationReport
    ) -> tuple[dict[str, dict[str, str]] | None, Path]:
        """``{object_id: {"caption", "style"}}`` (None when unreadable) and the file read."""
        csv_path, json_path = root / "captions.csv", root / "metadata.json"
        try:
            if csv_path.exists() or layout == "mesh_folder" or not json_path.exists():
                records = read_caption_records_csv(csv_path)
                # a file-name column names mesh files: their stems are the ids
                return {_object_id(k): v for k, v in records.items()}, csv_path
            return read_caption_records_json(json_path), json_path
        except CaptionError as err:
            report.add_error(err)
            return None, Path(err.path)

    # ---------------------------------------------------------------------------- Lightning

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        report = self.report if self.report is not None else self.validate()
        report.enforce(self.on_bad_file, len(self.skipped))
        if not self.objects:
            raise ValueError(f"{self.root}: no usable objects ({len(self.skipped)} skipped)")
        self.splits = {
            name: [self.objects[i] for i in index] for name, index in self._split_index.items()
        }
        if not self.splits["train"]:
            raise ValueError(
                "the training split is empty: add data or lower val_fraction/test_fraction"
            )
        log.info("captioned meshes %s: splits %s", self.root, report.splits)

    def dataset(self, split: str) -> CaptionedMeshDataset:
        """The dataset of ``split``; augmentation only for ``train`` (call :meth:`setup` first)."""
        if not self.splits:
            raise RuntimeError("call setup() first")
        augment = self.augment if split == "train" else None
        return CaptionedMeshDataset(self.splits[split], self._geometry_cache(), augment)

    def split_dataset(self, split: str) -> CaptionedMeshDataset:
        return self.dataset(split)

    @property
    def sample_prompts(self) -> list[str]:
        """The configured prompts, else up to 4 captions of validation (else training) objects."""
        if self._sample_prompts:
            return self._sample_prompts
        if not self.splits:
            self.setup()
        for name in ("val", "train"):
            prompts = [o.caption for o in self.splits[name]]
            if prompts:
                return prompts[:_NUM_SAMPLE_PROMPTS]
        return []


def _object_id(name: str) -> str:
    """The id a captions row names: a mesh file name's stem, else the text itself."""
    path = Path(name)
    return path.stem if path.suffix.lower() in MESH_EXTENSIONS else name


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in extensions
            ):
                out.setdefault(path.stem, []).append(path)
    return out


# --------------------------------------------------------------------------------------------
# Synthetic captioned shapes
# --------------------------------------------------------------------------------------------


class SyntheticCaptionedMeshDataModule(CaptionedMeshDataModule):
    """The synthetic shapes export (:mod:`genlab.data.synthetic_export`, with its ``style``
    column) as captioned meshes, generated on first use into ``cache_dir`` (or ``root``).

    ``export`` holds :func:`~genlab.data.synthetic_export.export_objaverse_layout`'s
    arguments (classes, num_per_class, voxel_size, seed, num_views, image_size, num_points).
    The export folder is keyed by those arguments, so changing them makes a new one.
    """

    def __init__(
        self,
        export: Mapping[str, Any] | None = None,
        root: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.export = dict(export or {})
        super().__init__(root=root, **kwargs)
        if self.root is None:
            if self.cache_dir is None:
                raise ValueError("synthetic_captioned needs data.root or data.cache_dir")
            key = cache_key({**self.export, "styles": True})
            self.root = self.cache_dir / "synthetic_captioned" / f"export-{key}"

    def prepare_data(self) -> None:
        self._ensure_export()

    def validate(self) -> ValidationReport:
        self._ensure_export()
        return super().validate()

    def _check_cache_dir(self, root: Path) -> None:
        # the export itself lives in the cache; only the geometry cache must not sit in it
        geometry = self._geometry_cache().cache_dir
        if geometry is not None and geometry.resolve().is_relative_to(root.resolve()):
            raise ValueError(f"cache_dir {self.cache_dir} is inside the data folder {root}")

    def _ensure_export(self) -> None:
        from genlab.data.synthetic_export import export_objaverse_layout

        root = self._data_root()
        if (root / "captions.csv").is_file():
            return
        log.info("writing the synthetic captioned shapes to %s", root)
        try:
            export_objaverse_layout(root, styles=True, **self.export)
        except FileExistsError:  # another process finished it first
            if not (root / "captions.csv").is_file():
                raise

"""Objects in the Objaverse/Shap-E layout: point clouds, renders, latents and captions.

Layout (written for the synthetic shapes by :mod:`genlab.data.synthetic_export`, whose
docstring has the details)::

    <root>/images/<object_id>/<view>.png     renders, RGBA (alpha = mask)
    <root>/normals/<object_id>/<view>.png    optional world-space normal maps (not read here)
    <root>/cameras/<object_id>/<view>.json   optional per-view cameras (not read here)
    <root>/points/<object_id>.npy|.ply       point cloud (N, 3) or (N, 6) with colours
    <root>/meshes/<object_id>.obj|.glb|...   optional source mesh (counted as an object only)
    <root>/latents/<object_id>.pt|.npy       optional precomputed latents
    <root>/captions.csv                      object_id,caption
    <root>/metadata.json                     image <-> object links

The objects are the ids found under ``points/``, ``latents/``, ``meshes/`` and the image
links. The image links come from ``metadata.json`` when it exists, else from the
``images/<object_id>/`` folders; a view is the image file's stem.

Batches of ``B`` objects (``N = num_points``, ``S = image_size``):

- ``object_id``: ``list[str]``;
- ``caption``: ``list[str]`` (``""`` for an object without caption, image mode only);
- ``points``: ``(B, N, 3)`` float32, as stored (the object's frame); resampled once per
  object (``fps`` or ``random``, seeded by the object id) and cached under ``cache_dir``;
- ``point_colors``: ``(B, N, 3)`` float32 in [0, 1], 0.5 where the file has no colours;
- ``image``: ``(B, 3, S, S)`` float32 in [0, 1], alpha composited on ``background``;
- ``latent``: ``(B, ...)`` float32 as stored, when ``latents/`` exists and ``latent`` is loaded.

``mode=text`` needs a caption for every object; ``mode=image`` always loads the image and
captions are optional. :meth:`ObjaverseDataModule.validate` checks the files that this
configuration reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from genlab.data.captions import CaptionError, read_captions_csv, read_metadata_json
from genlab.data.errors import DataFileError
from genlab.data.images import IMAGE_EXTENSIONS, read_image, resize_to
from genlab.data.loaders import SeededDataModule
from genlab.data.meshes import MESH_EXTENSIONS
from genlab.data.point_clouds import POINT_CLOUD_EXTENSIONS, read_point_cloud, resample
from genlab.data.splits import stratified_split
from genlab.data.validation import (
    Problem,
    ValidationReport,
    check_bad_file_policy,
    check_files,
    find_duplicates,
)
from genlab.data.voxel_dataset import cache_key

__all__ = [
    "LATENT_EXTENSIONS",
    "LOADABLE",
    "LatentReadError",
    "ObjaverseDataModule",
    "ObjaverseDataset",
    "ObjaverseObject",
    "read_latent",
]

log = logging.getLogger(__name__)

LOADABLE: tuple[str, ...] = ("points", "image", "latent")
MODES: tuple[str, ...] = ("text", "image")
LATENT_EXTENSIONS: tuple[str, ...] = (".pt", ".npy")
CACHE_VERSION = 1
_NUM_SAMPLE_PROMPTS = 4


class LatentReadError(DataFileError):
    """A latent file could not be read; the message names the file and the problem."""


def read_latent(path: str | os.PathLike[str]) -> torch.Tensor:
    """A latent as a float32 tensor: ``.pt`` (one tensor, loaded weights-only) or ``.npy``."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        else:
            raise LatentReadError(path, f"unsupported latent extension {suffix!r}")
    except LatentReadError:
        raise
    except FileNotFoundError:
        raise LatentReadError(path, "file not found") from None
    except Exception as err:  # torch/numpy raise many types for damaged files
        raise LatentReadError(path, f"cannot read latent: {type(err).__name__}: {err}") from err
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise LatentReadError(path, f"expected a numeric array, got dtype {value.dtype}")
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise LatentReadError(path, f"expected one tensor, got {type(value).__name__}")
    if value.numel() == 0:
        raise LatentReadError(path, f"empty latent (shape {tuple(value.shape)})")
    value = value.float()
    if not torch.isfinite(value).all():
        raise LatentReadError(path, "non-finite values (NaN or inf)")
    return value


@dataclass
class ObjaverseObject:
    """One object's files; ``images`` maps view (file stem) -> image, in sorted view order."""

    object_id: str
    caption: str | None = None
    points: Path | None = None
    images: dict[str, Path] = field(default_factory=dict)
    latent: Path | None = None


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ObjaverseDataset(Dataset):
    """Items of the batch keys in the module docstring (without the batch dimension).

    ``view``: ``"random"`` (a view drawn per item), ``"first"`` (the first in sorted order)
    or a view name.
    """

    def __init__(
        self,
        objects: Sequence[ObjaverseObject],
        load: Sequence[str] = ("points",),
        num_points: int = 16384,
        point_sampling: str = "fps",
        image_size: int = 256,
        view: str = "first",
        background: Sequence[int] = (255, 255, 255),
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.objects = list(objects)
        self.load = tuple(load)
        self.num_points = int(num_points)
        self.point_sampling = point_sampling
        self.image_size = int(image_size)
        self.view = view
        self.background = tuple(int(c) for c in background)
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        obj = self.objects[index]
        item: dict[str, Any] = {"object_id": obj.object_id, "caption": obj.caption or ""}
        if "points" in self.load:
            cloud = self._points(obj)
            item["points"] = torch.from_numpy(cloud[:, :3].copy())
            item["point_colors"] = torch.from_numpy(cloud[:, 3:].copy())
        if "image" in self.load:
            item["image"] = self._image(obj)
        if "latent" in self.load:
            assert obj.latent is not None, f"object {obj.object_id!r} has no latent"
            item["latent"] = read_latent(obj.latent)
        return item

    def _points(self, obj: ObjaverseObject) -> np.ndarray:
        """``(num_points, 6)`` float32 points + colours, from the cache when it has them."""
        assert obj.points is not None, f"object {obj.object_id!r} has no point cloud"
        cache = self._cache_path(obj.points)
        if cache is not None and cache.is_file():
            return np.load(cache, allow_pickle=False)
        points, colors = read_point_cloud(obj.points)
        seed = int.from_bytes(hashlib.sha1(obj.object_id.encode()).digest()[:8], "little")
        points, colors = resample(
            points,
            self.num_points,
            self.point_sampling,  # type: ignore[arg-type]
            rng=np.random.default_rng(seed),
            colors=colors,
            fps_max_input=8 * self.num_points,
        )
        if colors is None:
            colors = np.full_like(points, 0.5)
        cloud = np.concatenate([points, colors], axis=1).astype(np.float32)
        if cache is not None:
            _save_npy_atomic(cache, cloud)
        return cloud

    def _cache_path(self, source: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = source.stat()
        key = cache_key(
            {
                "file": str(source.resolve()),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "num_points": self.num_points,
                "method": self.point_sampling,
                "version": CACHE_VERSION,
            }
        )
        return self.cache_dir / "points" / f"{source.stem}-{key}.npy"

    def _image(self, obj: ObjaverseObject) -> torch.Tensor:
        views = list(obj.images)
        if self.view == "random":
            name = views[int(torch.randint(len(views), (1,)).item())]
        elif self.view == "first":
            name = views[0]
        else:
            name = self.view
        img = read_image(obj.images[name], "RGB", self.background)
        img = resize_to(img, self.image_size, "center_crop")
        array = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npy")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Index and validation
# --------------------------------------------------------------------------------------------


def _files_by_id(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """``{stem: [files]}`` of the files directly in ``folder`` with one of ``extensions``."""
    out: dict[str, list[Path]] = defaultdict(list)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in extensions
            ):
                out[path.stem].append(path)
    return dict(out)


def _folder_image_links(root: Path) -> dict[str, str]:
    """``{"images/<id>/<file>": id}`` from the ``images/<object_id>/`` folders."""
    links: dict[str, str] = {}
    images = root / "images"
    if not images.is_dir():
        return links
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                links[path.relative_to(root).as_posix()] = folder.name
    return links


@dataclass
class _Found:
    """An object folder's files by object id."""

    points: dict[str, list[Path]]
    latents: dict[str, list[Path]]
    images: dict[str, dict[str, Path]]  # object id -> view -> file, views sorted
    captions: dict[str, str] | None  # None: captions.csv unreadable
    use_latents: bool
    ids: list[str] = field(default_factory=list)


@dataclass
class _Check:
    """A report being filled and the ids of the objects with problems."""

    report: ValidationReport
    bad: set[str] = field(default_factory=set)
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def flag(self, object_id: str, path: str | os.PathLike[str], reason: str) -> None:
        self.report.add(path, reason)
        self.mark(object_id, f"{Path(path).name}: {reason}")

    def files(self, owners: dict[Path, str], read: Callable[[Path], object], desc: str) -> None:
        """Read the files of objects not flagged yet; flag the owners of unreadable ones."""
        paths = sorted(p for p, object_id in owners.items() if object_id not in self.bad)
        first_new = len(self.report.problems)
        good = set(check_files(paths, read, self.report, desc))
        by_path = {str(p): owners[p] for p in paths}
        for problem in self.report.problems[first_new:]:
            owner = by_path.get(problem.path) or by_path.get(problem.path.rsplit(":", 1)[0])
            if owner is not None:
                self.mark(owner, f"{Path(problem.path).name}: {problem.reason}")
        for p in paths:
            if p not in good and owners[p] not in self.reasons:
                self.mark(owners[p], f"{p.name}: unreadable")

    def mark(self, object_id: str, reason: str) -> None:
        self.bad.add(object_id)
        self.reasons.setdefault(object_id, []).append(reason)

    def skipped(self, ids: Iterable[str]) -> list[Problem]:
        """One :class:`Problem` per bad object among ``ids`` (path: the object id)."""
        wanted = set(ids)
        return [Problem(i, "; ".join(self.reasons[i])) for i in sorted(self.bad & wanted)]


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class ObjaverseDataModule(SeededDataModule):
    """Reads, validates, splits and batches a folder in the Objaverse/Shap-E layout.

    ``views``: ``"random"`` (a random view per item in training, the first in val/test),
    ``"first"`` or a view name (that view everywhere). Splits are seeded and written to
    ``split_file`` (reused when it exists: ids no longer usable are dropped, objects absent
    from it are left out, both with a warning). ``on_bad_file=skip`` drops the objects with
    problems and lists them in :attr:`skipped` (a Problem per object, path = object id). The training order is drawn from the
    module's own generator (checkpointed), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "text",
        load: Sequence[str] = ("points",),
        num_points: int = 16384,
        point_sampling: str = "fps",
        image_size: int = 256,
        views: str = "random",
        background: Sequence[int] = (255, 255, 255),
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        split_file: str | os.PathLike[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_file: str = "error",
        cache_dir: str | os.PathLike[str] | None = None,
        sample_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        unknown = [k for k in load if k not in LOADABLE]
        if unknown:
            raise ValueError(f"load: unknown entries {unknown}, expected some of {list(LOADABLE)}")
        if point_sampling not in ("fps", "random"):
            raise ValueError(f"point_sampling must be 'fps' or 'random', got {point_sampling!r}")
        if len(background) != 3:
            raise ValueError(f"background must be 3 values (RGB), got {list(background)}")
        self.root = Path(root).expanduser()
        self.mode = mode
        wanted = set(load) | ({"image"} if mode == "image" else set())
        self.load = tuple(k for k in LOADABLE if k in wanted)
        self.num_points = int(num_points)
        self.point_sampling = point_sampling
        self.image_size = int(image_size)
        self.views = str(views)
        self.background = tuple(int(c) for c in background)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.split_file = Path(split_file) if split_file else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_file = check_bad_file_policy(on_bad_file)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if self.cache_dir is not None and _is_inside(self.cache_dir, self.root):
            raise ValueError(
                f"cache_dir {self.cache_dir} is inside the data folder {self.root}; "
                "caches must not be written into the data"
            )
        self._sample_prompts = list(sample_prompts) if sample_prompts else None
        self.report: ValidationReport | None = None
        self.objects: list[ObjaverseObject] = []
        self.skipped: list[Problem] = []
        self.splits: dict[str, list[ObjaverseObject]] = {}
        self._split_ids: dict[str, list[str]] = {}

    # ---------------------------------------------------------------------------- validation

    def validate(self) -> ValidationReport:
        """Count what the folder holds, check the files this configuration reads, split.

        Fills :attr:`objects` (usable objects, sorted by id) and :attr:`skipped` (one
        :class:`Problem` per object with problems, path = object id) and returns the report; raises nothing for bad data.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root}: no such folder")
        check = _Check(ValidationReport(str(self.root)))
        found = self._scan(check)
        report = check.report
        report.count("objects", len(found.ids))
        report.count("images", sum(len(v) for v in found.images.values()))
        report.count("point clouds", sum(len(v) for v in found.points.values()))
        report.count("captions", len(found.captions or {}))
        report.count("latents", sum(len(v) for v in found.latents.values()))
        self._check_duplicates(found, check)
        self._check_presence(found, check)
        self._check_files(found, check)

        self.skipped = check.skipped(found.ids)
        self.objects = [
            ObjaverseObject(
                object_id,
                caption=(found.captions or {}).get(object_id),
                points=found.points.get(object_id, [None])[0],
                images=found.images.get(object_id, {}),
                latent=found.latents.get(object_id, [None])[0] if found.use_latents else None,
            )
            for object_id in found.ids
            if object_id not in check.bad
        ]
        self._split_ids = self._split([o.object_id for o in self.objects])
        for name, part in self._split_ids.items():
            report.split(name, len(part))
        self.report = report
        return report

    def _scan(self, check: _Check) -> _Found:
        """Find the files by object id; report unreadable captions.csv / metadata.json."""
        root = self.root
        images: dict[str, dict[str, Path]] = defaultdict(dict)
        for name, object_id in sorted(self._image_links(check).items()):
            path = root / name
            view = path.stem if path.stem not in images[object_id] else path.name
            images[object_id][view] = path
        found = _Found(
            points=_files_by_id(root / "points", POINT_CLOUD_EXTENSIONS),
            latents=_files_by_id(root / "latents", LATENT_EXTENSIONS),
            images={i: dict(sorted(views.items())) for i, views in images.items()},
            captions=self._captions(check.report),
            use_latents="latent" in self.load and (root / "latents").is_dir(),
        )
        meshes = _files_by_id(root / "meshes", MESH_EXTENSIONS)
        found.ids = sorted({*found.points, *found.latents, *meshes, *found.images})
        return found

    def _image_links(self, check: _Check) -> dict[str, str]:
        """``{file name relative to root: object id}``: metadata.json, else the folders.

        With images loaded, an unreadable metadata.json and images it names that do not
        exist are problems (the objects of those images are flagged).
        """
        metadata = self.root / "metadata.json"
        if not metadata.exists():
            return _folder_image_links(self.root)
        try:
            links = read_metadata_json(metadata)
        except CaptionError as err:
            if "image" in self.load:
                check.report.add_error(err)
            return {}
        present = {n: i for n, i in links.items() if (self.root / n).is_file()}
        if "image" in self.load:
            for name, object_id in sorted(links.items()):
                if name not in present:
                    check.flag(
                        object_id, metadata, f"image {name!r} of object {object_id!r} not found"
                    )
        return present

    def _captions(self, report: ValidationReport) -> dict[str, str] | None:
        """The captions (None when captions.csv is unreadable; {} when absent in image mode)."""
        path = self.root / "captions.csv"
        if self.mode == "image" and not path.exists():
            return {}
        try:
            return read_captions_csv(path)
        except CaptionError as err:
            report.add_error(err)
            return None

    def _check_duplicates(self, found: _Found, check: _Check) -> None:
        """Two loaded files for one id (``x.npy`` and ``x.ply``) flag the object."""
        kinds = [("points", found.points)] if "points" in self.load else []
        kinds += [("latents", found.latents)] if found.use_latents else []
        for kind, files in kinds:
            for object_id in find_duplicates(p.stem for paths in files.values() for p in paths):
                first, *others = files[object_id]
                also = ", ".join(f"{kind}/{p.name}" for p in others)
                check.flag(object_id, first, f"duplicate object id {object_id!r} (also {also})")

    def _check_presence(self, found: _Found, check: _Check) -> None:
        """Captions for unknown objects; objects missing a caption, points, images, latent."""
        root = self.root
        captions_path = root / "captions.csv"
        if found.captions is not None:
            for object_id in sorted(set(found.captions) - set(found.ids)):
                check.report.add(captions_path, f"caption for unknown object {object_id!r}")
        fixed_view = self.views not in ("random", "first")
        for object_id in found.ids:
            if self.mode == "text":
                if found.captions is None:
                    check.mark(
                        object_id, "captions.csv is unreadable"
                    )  # reported once, for the file
                elif object_id not in found.captions:
                    check.flag(object_id, captions_path, f"no caption for object {object_id!r}")
            if "points" in self.load and object_id not in found.points:
                check.flag(object_id, root / "points", f"no point cloud for object {object_id!r}")
            views = found.images.get(object_id, {})
            folder = root / "images" / object_id
            if "image" in self.load and not views:
                check.flag(object_id, folder, f"no images for object {object_id!r}")
            elif "image" in self.load and fixed_view and self.views not in views:
                check.flag(object_id, folder, f"no view {self.views!r} for object {object_id!r}")
            if found.use_latents and object_id not in found.latents:
                check.flag(object_id, root / "latents", f"no latent for object {object_id!r}")

    def _check_files(self, found: _Found, check: _Check) -> None:
        """Read every loaded file of the objects not flagged yet (images fully decoded)."""
        if "points" in self.load:
            check.files(
                {paths[0]: i for i, paths in found.points.items()},
                read_point_cloud,
                "checking point clouds",
            )
        if "image" in self.load:
            fixed_view = self.views not in ("random", "first")
            owners = {
                path: object_id
                for object_id, views in found.images.items()
                for view, path in views.items()
                if not fixed_view or view == self.views
            }
            check.files(owners, read_image, "checking images")
        if found.use_latents:
            shapes: dict[Path, tuple[int, ...]] = {}

            def read_shape(path: Path) -> None:
                shapes[path] = tuple(read_latent(path).shape)

            owners = {paths[0]: i for i, paths in found.latents.items()}
            check.files(owners, read_shape, "checking latents")
            if shapes:
                common = Counter(shapes.values()).most_common(1)[0][0]
                for path, shape in sorted(shapes.items()):
                    if shape != common:
                        reason = f"latent shape {shape} differs from the others' {common}"
                        check.flag(owners[path], path, reason)

    # ---------------------------------------------------------------------------- splits

    def _split(self, ids: list[str]) -> dict[str, list[str]]:
        if self.split_file is not None and self.split_file.is_file():
            return self._read_split_file(ids)
        parts = stratified_split(
            np.zeros(len(ids), dtype=np.int64),
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        return {name: [ids[i] for i in index] for name, index in parts.items()}

    def _read_split_file(self, ids: list[str]) -> dict[str, list[str]]:
        assert self.split_file is not None
        try:
            data = json.loads(self.split_file.read_text(encoding="utf-8"))
            splits = {name: [str(i) for i in data[name]] for name in ("train", "val", "test")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataFileError(
                self.split_file, f"not a split file (train/val/test id lists): {err}"
            ) from err
        known = set(ids)
        listed = {i for part in splits.values() for i in part}
        gone = sorted(listed - known)
        if gone:
            log.warning("%s: %d listed objects are not usable, dropped", self.split_file, len(gone))
        new = sorted(known - listed)
        if new:
            log.warning(
                "%s: %d objects are not in the split file, left out", self.split_file, len(new)
            )
        return {name: [i for i in part if i in known] for name, part in splits.items()}

    def _write_split_file(self, splits: dict[str, list[str]]) -> None:
        if self.split_file is None or self.split_file.is_file():
            return
        data = {
            "root": str(self.root),
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            **splits,
        }
        path = self.split_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---------------------------------------------------------------------------- Lightning

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        # a report from an earlier validate() (train.py checks the data first) is reused
        report = self.report if self.report is not None else self.validate()
        report.enforce(self.on_bad_file, len(self.skipped))
        if not self.objects:
            raise ValueError(f"{self.root}: no usable objects ({len(self.skipped)} skipped)")
        by_id = {o.object_id: o for o in self.objects}
        self._write_split_file(self._split_ids)
        self.splits = {name: [by_id[i] for i in part] for name, part in self._split_ids.items()}
        log.info("objaverse data %s: splits %s", self.root, report.splits)
        if not self.splits["train"]:
            raise ValueError(
                "the training split is empty: add data or lower val_fraction/test_fraction"
            )

    @property
    def sample_prompts(self) -> list[str]:
        """The configured prompts, else up to 4 captions of validation (else training) objects."""
        if self._sample_prompts:
            return self._sample_prompts
        if not self.splits:
            self.setup()
        for name in ("val", "train"):
            prompts = [o.caption for o in self.splits[name] if o.caption]
            if prompts:
                return prompts[:_NUM_SAMPLE_PROMPTS]
        return []

    def dataset(self, split: str, view: str | None = None) -> ObjaverseDataset:
        """The :class:`ObjaverseDataset` of ``split`` (call :meth:`setup` first)."""
        if not self.splits:
            raise RuntimeError("call setup() first")
        if view is None:
            view = self.views
            if view == "random" and split != "train":
                view = "first"
        use_latent = "latent" in self.load and (self.root / "latents").is_dir()
        load = [k for k in self.load if k != "latent" or use_latent]
        return ObjaverseDataset(
            self.splits[split],
            load,
            self.num_points,
            self.point_sampling,
            self.image_size,
            view,
            self.background,
            self.cache_dir,
        )

    def split_dataset(self, split: str) -> ObjaverseDataset:
        return self.dataset(split)


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())

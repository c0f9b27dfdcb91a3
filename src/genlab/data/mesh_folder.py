"""Voxel data from a folder of meshes, in the ModelNet or the ShapeNetCore layout.

* ModelNet: ``<root>/<category>/{train,test}/*.off`` (also .obj/.ply/.stl/.glb/.gltf); the
  folder defines the split, files directly under a category count as train. A root holding
  only the data set's folder (``modelnet40/ModelNet40/<category>/...``) is looked into.
* ShapeNetCore: ``<root>/<synset_id>/<model_id>/models/model_normalized.obj`` (v2; v1 has
  ``<model_id>/model.obj``), or ``root`` is one synset folder itself (its synset id is the
  folder name or the one category asked for). The category name comes from
  :data:`SHAPENET_SYNSETS` (``03001627`` -> "chair"); ShapeNet ships no split, so the
  datamodule draws one.

Every mesh is voxelised once, with a progress bar, and cached together with the list of bad
files, so :meth:`MeshFolderVoxels.validate` after a cached load reads no mesh.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genlab.data.meshes import MESH_EXTENSIONS, MeshReadError, load_mesh, normalize_to_unit_cube
from genlab.data.validation import Problem, ValidationReport, check_bad_file_policy, check_files
from genlab.data.voxel_dataset import VoxelSet, cache_key
from genlab.geometry.voxelize import voxelize_mesh

__all__ = [
    "LAYOUTS",
    "SHAPENET_SYNSETS",
    "MeshFolderVoxels",
    "caption_for",
    "detect_layout",
    "scan",
    "synset_name",
    "voxelize_file",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 2
SPLIT_FOLDERS = ("train", "test")
LAYOUTS = ("auto", "modelnet", "shapenet")

#: ShapeNetCore synset ids -> category names (the 13 common categories first).
SHAPENET_SYNSETS: dict[str, str] = {
    "02691156": "airplane",
    "02828884": "bench",
    "02933112": "cabinet",
    "02958343": "car",
    "03001627": "chair",
    "03211117": "display",
    "03636649": "lamp",
    "03691459": "loudspeaker",
    "04090263": "rifle",
    "04256520": "sofa",
    "04379243": "table",
    "04401088": "telephone",
    "04530566": "watercraft",
    # the other ShapeNetCore v2 categories
    "02747177": "trash bin",
    "02773838": "bag",
    "02801938": "basket",
    "02808440": "bathtub",
    "02818832": "bed",
    "02843684": "birdhouse",
    "02871439": "bookshelf",
    "02876657": "bottle",
    "02880940": "bowl",
    "02924116": "bus",
    "02942699": "camera",
    "02946921": "can",
    "02954340": "cap",
    "02992529": "cellphone",
    "03046257": "clock",
    "03085013": "keyboard",
    "03207941": "dishwasher",
    "03261776": "earphone",
    "03325088": "faucet",
    "03337140": "file cabinet",
    "03467517": "guitar",
    "03513137": "helmet",
    "03593526": "jar",
    "03624134": "knife",
    "03642806": "laptop",
    "03710193": "mailbox",
    "03759954": "microphone",
    "03761084": "microwave",
    "03790512": "motorbike",
    "03797390": "mug",
    "03928116": "piano",
    "03938244": "pillow",
    "03948459": "pistol",
    "03991062": "flowerpot",
    "04004475": "printer",
    "04074963": "remote control",
    "04099429": "rocket",
    "04225987": "skateboard",
    "04330267": "stove",
    "04460130": "tower",
    "04468005": "train",
    "04554684": "washer",
}
#: Where a ShapeNet model folder keeps its mesh (v2, then v1).
SHAPENET_MESHES = ("models/model_normalized.obj", "model.obj")
_SYNSET_ID = re.compile(r"^\d{8}$")
_PROBE = 5  # sub-folders looked at per folder when detecting the layout


def caption_for(category: str) -> str:
    """``night_stand`` -> "a night stand"; ``armchair`` -> "an armchair"."""
    words = category.replace("_", " ").strip()
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def synset_name(synset: str) -> str:
    """ShapeNet category name of a synset id (``03001627`` -> ``chair``); unknown ids stay as they are."""
    return SHAPENET_SYNSETS.get(synset, synset)


@dataclass(frozen=True)
class MeshItem:
    """One mesh of the folder: its file (None: the ShapeNet model folder has none), class and split."""

    path: Path | None
    folder: Path  # the file's folder (ModelNet) or the model folder (ShapeNet)
    category: str  # folder name: ModelNet category or ShapeNet synset id
    class_name: str  # what captions and class labels use
    split: str | None  # "train" / "test" where the folder defines it
    item_id: str  # "<category>/<split>/<stem>" or "<synset>/<model_id>"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _model_mesh(model_dir: Path) -> Path | None:
    """The mesh file of a ShapeNet model folder, if it has one."""
    for rel in SHAPENET_MESHES:
        if (model_dir / rel).is_file():
            return model_dir / rel
    return None


def _looks_like_model(folder: Path) -> bool:
    return _model_mesh(folder) is not None or (folder / "models").is_dir()


def _is_synset_folder(folder: Path) -> bool:
    """Whether ``folder`` holds ShapeNet model folders (checks its first few sub-folders)."""
    children = (p for p in sorted(folder.iterdir()) if p.is_dir())
    return any(_looks_like_model(p) for p in itertools.islice(children, _PROBE))


def detect_layout(root: Path) -> str:
    """``"shapenet"`` when ``root`` is a ShapeNetCore folder (or one synset of it), else ``"modelnet"``."""
    if _is_synset_folder(root):
        return "shapenet"
    synsets = [p for p in _subdirs(root) if _SYNSET_ID.match(p.name)]
    if any(_is_synset_folder(p) for p in synsets):
        return "shapenet"
    return "modelnet"


def _missing_root(root: Path, fetch_hint: str | None) -> FileNotFoundError:
    hint = f"; run `{fetch_hint}` to download it" if fetch_hint else ""
    return FileNotFoundError(f"data.dataset.root={root}: no such folder{hint}")


def scan(
    root: Path,
    categories: Sequence[str] | None = None,
    layout: str = "auto",
    fetch_hint: str | None = None,
) -> list[MeshItem]:
    """Every mesh of the folder (ShapeNet model folders without a mesh included, ``path=None``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if not root.is_dir():
        raise _missing_root(root, fetch_hint)
    if layout == "auto":
        layout = detect_layout(root)
    items = (
        _scan_shapenet(root, categories)
        if layout == "shapenet"
        else _scan_modelnet(root, categories)
    )
    if not items:
        hint = f" (run `{fetch_hint}` to download the data set)" if fetch_hint else ""
        raise FileNotFoundError(
            f"{root}: no mesh files ({', '.join(MESH_EXTENSIONS)}) in categories "
            f"{list(categories) if categories else 'any'}{hint}"
        )
    return items


def _check_wanted(root: Path, wanted: Sequence[str], found: Sequence[str]) -> None:
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise FileNotFoundError(f"{root}: categories {missing} not found (present: {list(found)})")


def _unwrap(root: Path) -> Path:
    """The data set folder of a folder holding only it (an archive unpacked as it is, e.g.
    ``modelnet40/ModelNet40/<category>/train``); else ``root``."""
    subdirs = _subdirs(root)
    if len(subdirs) != 1:
        return root
    inner = itertools.islice(_subdirs(subdirs[0]), _PROBE)
    return subdirs[0] if any((c / s).is_dir() for c in inner for s in SPLIT_FOLDERS) else root


def _scan_modelnet(root: Path, categories: Sequence[str] | None) -> list[MeshItem]:
    root = _unwrap(root)
    found = [p.name for p in _subdirs(root)]
    wanted = list(categories) if categories else found
    _check_wanted(root, wanted, found)
    items = []
    for category in wanted:
        for path in sorted((root / category).rglob("*")):
            if path.suffix.lower() in MESH_EXTENSIONS and path.is_file():
                rel = path.relative_to(root / category).parts
                split = rel[0] if len(rel) > 1 and rel[0] in SPLIT_FOLDERS else "train"
                item_id = f"{category}/{split}/{path.stem}"
                items.append(MeshItem(path, path.parent, category, category, split, item_id))
    return items


def _scan_shapenet(root: Path, categories: Sequence[str] | None) -> list[MeshItem]:
    if _is_synset_folder(root):
        # root is one synset folder: its id is the folder name, or the one category asked for
        # (a synset folder extracted under the data set's own name, e.g. shapenet_chairs)
        synset = root.name
        if not _SYNSET_ID.match(synset) and categories and len(categories) == 1:
            synset = _synset_id(categories[0])
        by_id = {synset: root}
    else:
        by_id = {p.name: p for p in _subdirs(root)}
    if categories:
        # a category may be given by synset id or by name ("chair")
        wanted = [c if c in by_id else _synset_id(c) for c in categories]
        missing = sorted(c for c, w in zip(categories, wanted, strict=True) if w not in by_id)
        _check_wanted(root, missing, list(by_id))
    else:
        wanted = list(by_id)
    items = []
    for synset in wanted:
        for model_dir in _subdirs(by_id[synset]):
            item_id = f"{synset}/{model_dir.name}"
            mesh = _model_mesh(model_dir)
            items.append(MeshItem(mesh, model_dir, synset, synset_name(synset), None, item_id))
    return items


def _synset_id(category: str) -> str:
    """Synset id of a ShapeNet category given by id or name (``chair`` -> ``03001627``)."""
    by_name = {name: synset for synset, name in SHAPENET_SYNSETS.items()}
    return by_name.get(category, category)


def voxelize_file(path: Path, resolution: int) -> np.ndarray:
    """Load, centre and scale into the unit cube (one voxel of margin), and solid-voxelise one mesh.

    Raises :class:`MeshReadError` for unreadable meshes, meshes without faces or with
    non-finite vertices, degenerate (zero-extent) meshes and meshes that voxelise to nothing.
    """
    mesh = load_mesh(path)
    try:
        mesh = normalize_to_unit_cube(mesh, margin=1.0 / resolution)
    except ValueError as err:
        raise MeshReadError(path, str(err)) from err
    grid = voxelize_mesh(mesh, resolution, fill=True)
    if not grid.any():
        raise MeshReadError(path, "voxelises to an empty grid")
    return grid


@dataclass
class _Pass:
    """The result of one voxelisation pass (or of its cache)."""

    key: str
    report: ValidationReport
    data: VoxelSet | None  # None: not read from the cache yet, or no usable mesh


class MeshFolderVoxels:
    """Config-facing source: voxelises every mesh once (with a progress bar) and caches the grids.

    The cache key covers file names, sizes and modification times, so edited data is
    re-voxelised; the cache also keeps the bad files found, whatever ``on_bad_file`` is.
    Bad files are unreadable meshes, meshes without faces, with non-finite vertices or of
    zero extent, meshes that voxelise to an empty grid, duplicate ids (the same file stem
    twice in one category and split; the first is kept) and ShapeNet model folders without a
    mesh. ``on_bad_file="error"`` makes :meth:`load` raise
    :class:`~genlab.data.validation.DataValidationError` listing all of them;
    ``"skip"`` leaves them out and lists them in :attr:`skipped`.

    ``layout`` is ``modelnet``, ``shapenet`` or ``auto`` (detected from the folder). ``name``
    names the data set in reports (default: the folder name); ``fetch_hint`` is the command
    that downloads it, quoted when ``root`` is missing.
    """

    def __init__(
        self,
        root: str | Path,
        voxel_size: int = 32,
        categories: Sequence[str | int] | None = None,
        cache_dir: str | Path | None = None,
        on_bad_file: str = "error",
        layout: str = "auto",
        name: str | None = None,
        fetch_hint: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.on_bad_file = on_bad_file
        self.root = Path(root).expanduser()
        self.voxel_size = int(voxel_size)
        # a synset id the command line parsed as an int (03001627 -> 3001627) gets its zeros back
        self.categories = (
            [f"{c:08d}" if isinstance(c, int) else str(c) for c in categories]
            if categories
            else None
        )
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.layout = layout
        self.name = name or self.root.name
        self.fetch_hint = fetch_hint
        self.skipped: list[Problem] = []  # what on_bad_file=skip leaves out
        self._pass: _Pass | None = None

    @property
    def on_bad_file(self) -> str:
        return self._on_bad_file

    @on_bad_file.setter
    def on_bad_file(self, value: str) -> None:
        self._on_bad_file = check_bad_file_policy(value)

    # ------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Voxelise and cache once (call on one process only); bad files do not stop it."""
        self._run(need_data=False)

    def load(self) -> VoxelSet:
        """The usable grids; with ``on_bad_file="error"`` raises listing every bad file."""
        result = self._run(need_data=True)
        report = result.report
        if self.on_bad_file == "error":
            report.raise_if_bad()
        if result.data is None:
            raise ValueError(
                f"{self.root}: every mesh was unreadable ({len(report.problems)} skipped)"
            )
        if self.skipped:
            log.warning(
                "%d of %d meshes skipped (data.on_bad_file=skip): %s",
                len(self.skipped),
                report.counts.get("meshes found", 0),
                "; ".join(str(p) for p in self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else ""),
            )
        return result.data

    def validate(self) -> ValidationReport:
        """Counts (meshes found, usable meshes per category), the folder's split and every bad file.

        Reuses the voxelisation pass and its cache; never raises for bad files.
        """
        return copy.deepcopy(self._run(need_data=False).report)

    # ------------------------------------------------------------------------------------
    # the voxelisation pass and its cache
    # ------------------------------------------------------------------------------------

    def _scan(self) -> list[MeshItem]:
        return scan(self.root, self.categories, self.layout, self.fetch_hint)

    def _key(self, items: list[MeshItem]) -> str:
        files = []
        for item in items:
            target = item.path or item.folder
            stat = target.stat()
            files.append((str(target.relative_to(self.root)), stat.st_size, stat.st_mtime_ns))
        params = {
            "root": str(self.root.resolve()),
            "files": files,
            "voxel_size": self.voxel_size,
            "version": CACHE_VERSION,
        }
        return cache_key(params)

    def _cache_paths(self, key: str) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"meshes_{key}.npz", self.cache_dir / f"meshes_{key}.report.json"

    def _run(self, need_data: bool) -> _Pass:
        items = self._scan()
        key = self._key(items)
        if self._pass is None or self._pass.key != key:
            self._pass = self._read_cache(key) or self._voxelize(key, items)
        result = self._pass
        if need_data and result.data is None and _usable(result.report):
            paths = self._cache_paths(key)
            assert paths is not None
            result.data = VoxelSet.load(paths[0])
        self.skipped = list(result.report.problems) if self.on_bad_file == "skip" else []
        return result

    def _read_cache(self, key: str) -> _Pass | None:
        paths = self._cache_paths(key)
        if paths is None or not paths[1].exists():
            return None
        grids, report_path = paths
        try:
            report = ValidationReport.read_json(report_path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cache %s (%s)", report_path, err)
            return None
        if _usable(report) and not grids.exists():
            return None
        return _Pass(key, report, None)

    def _voxelize(self, key: str, items: list[MeshItem]) -> _Pass:
        report = ValidationReport(self.name)
        report.count("meshes found", len(items))
        todo: list[MeshItem] = []
        first_of: dict[str, Path] = {}
        for item in items:
            if item.path is None:
                report.add(item.folder, f"no mesh file (expected {' or '.join(SHAPENET_MESHES)})")
            elif item.item_id in first_of:
                other = first_of[item.item_id].relative_to(self.root)
                report.add(item.path, f"duplicate id {item.item_id!r} (also {other.as_posix()})")
            else:
                first_of[item.item_id] = item.path
                todo.append(item)

        grids: list[np.ndarray] = []

        def check(item: MeshItem) -> None:
            assert item.path is not None
            grids.append(voxelize_file(item.path, self.voxel_size))

        good = check_files(todo, check, report, desc=f"voxelising {self.name}")
        report.problems.sort(key=lambda p: p.path)

        class_names = sorted({item.class_name for item in good})
        all_classes = sorted({item.class_name for item in items})
        report.count("usable meshes", len(good))
        report.count("categories", len(all_classes))
        for class_name in all_classes:
            report.count(
                f"{class_name} meshes", sum(item.class_name == class_name for item in good)
            )
        has_splits = any(item.split is not None for item in items)
        if has_splits:
            for split in SPLIT_FOLDERS:
                report.split(split, sum(item.split == split for item in good))

        data = None
        if good:
            data = VoxelSet(
                np.stack(grids),
                [caption_for(item.class_name) for item in good],
                np.asarray([class_names.index(item.class_name) for item in good]),
                class_names,
                [str(item.split) for item in good] if has_splits else None,
                [(item.path or item.folder).relative_to(self.root).as_posix() for item in good],
            )
        if report.problems:
            log.warning("%s: %d bad mesh file(s) found", self.name, len(report.problems))
        paths = self._cache_paths(key)
        if paths is not None:
            if data is not None:
                data.save(paths[0])
            report.write_json(paths[1])  # written last: the cache is complete once it exists
            log.info("cached %d voxelised meshes at %s", len(good), paths[0])
        return _Pass(key, report, data)


def _usable(report: ValidationReport) -> bool:
    return report.counts.get("usable meshes", 0) > 0

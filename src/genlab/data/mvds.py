"""Multi-view data for multi-view diffusion (images + normal maps + cameras of each object).

Folder layout (the synthetic exporter writes it too)::

    <root>/images/<object_id>/<view>.png    RGB or RGBA (alpha = mask); any format read_image reads
    <root>/normals/<object_id>/<view>.png   world-space normal maps, rgb = (n * 0.5 + 0.5) * 255
    <root>/masks/<object_id>/<view>.png     optional, grayscale (else the image's alpha, else
                                            all foreground)
    <root>/cameras/<object_id>/<view>.json  genlab.data.cameras JSON, one per view

The same file stem links a view's image, normal map, mask and camera. Views are ordered by
natural sort of their names (``v2`` before ``v10``).

Items
-----
Of an object's V views (V >= ``num_views`` = N) the N targets are evenly spaced through the
sorted views: ``offset + floor(i * V / N)`` for ``i < N``, ``offset`` 0, or drawn from
``[0, V // N)`` in training. The conditioning view is ``cond_view`` (a view name), or with
``cond_view="random"`` any view in training and the first view otherwise. Images and normal
maps are composited onto the background with the view's mask (a ``"random"`` background is
one uniform colour per item in training, white otherwise) and resized to ``image_size``
(shorter side, centre crop). Each item holds exactly (``S`` = image_size, ``C`` = clip_size)::

    image_cond           (N, 3, S, S) float32 in [0, 1]   the conditioning view, repeated N times
    image_target         (N, 3, S, S) float32 in [0, 1]
    normal_target        (N, 3, S, S) float32 in [0, 1]   encoded normal maps
    image_cond_vae       (N, 3, S, S) float32 in [-1, 1]  2 * image_cond - 1
    image_cond_CLIP      (N, 3, C, C) float32             resized to C, (x - CLIP_MEAN) / CLIP_STD
    image_target_vae     (N, 3, S, S) float32 in [-1, 1]
    normal_target_vae    (N, 3, S, S) float32 in [-1, 1]
    camera_embed_image   (N, 10) float32   camera_embeddings(cond, targets, "image")
    camera_embed_normal  (N, 10) float32   camera_embeddings(cond, targets, "normal")

and a DataLoader batch puts the batch size B in front: ``(B, N, 3, S, S)``, ``(B, N, 10)``.

Bad data
--------
:class:`MultiViewDataModule.setup` lists every object's files, reads its cameras and the
headers of its images; missing normal maps or cameras, view sets that do not match, too few
views and unreadable files raise a :class:`~genlab.data.errors.DataFileError` naming the file
(``on_bad_file="error"``) or drop the object into ``datamodule.skipped`` (``"skip"``). Damage
that only full decoding shows (a truncated image) is found by ``validate()``, or when the item
is loaded: with ``"skip"`` the next readable object is returned in its place.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from genlab.data.cameras import Camera, camera_embeddings, read_camera_json
from genlab.data.errors import DataFileError
from genlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    read_image,
    register_heif,
    resize_to,
)
from genlab.data.loaders import SeededDataModule
from genlab.data.validation import (
    Problem,
    ValidationReport,
    check_bad_file_policy,
    check_files,
)

__all__ = [
    "BACKGROUNDS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ITEM_KEYS",
    "MultiViewDataModule",
    "MultiViewDataset",
    "MultiViewObject",
    "MultiViewReadError",
    "find_objects",
    "scan_object",
]

log = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: Fixed background colours (RGB in [0, 1]); ``"random"`` is also accepted.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
ITEM_KEYS: tuple[str, ...] = (
    "image_cond",
    "image_target",
    "normal_target",
    "image_cond_vae",
    "image_cond_CLIP",
    "image_target_vae",
    "normal_target_vae",
    "camera_embed_image",
    "camera_embed_normal",
)


class MultiViewReadError(DataFileError):
    """A multi-view object is incomplete or inconsistent; the message names the file."""


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiViewObject:
    """The files and cameras of one object; views in natural order."""

    object_id: str
    views: tuple[str, ...]
    images: tuple[Path, ...]
    normals: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    cameras: tuple[Camera, ...]


def find_objects(root: str | os.PathLike[str]) -> list[str]:
    """The object ids (folders under ``<root>/images``), sorted; FileNotFoundError when none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (the multi-view data root)")
    images = root / "images"
    ids = (
        sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        if images.is_dir()
        else []
    )
    if not ids:
        raise FileNotFoundError(
            f"{images}: no object folders (expected <root>/images/<object_id>/<view>.png)"
        )
    return ids


def scan_object(
    root: str | os.PathLike[str],
    object_id: str,
    num_views: int = 1,
    cond_view: str = "random",
    probe_images: bool = True,
) -> MultiViewObject:
    """List, match and check one object's files and read its cameras.

    Raises :class:`MultiViewReadError` for missing or extra files, fewer views than
    ``num_views`` and a missing ``cond_view``; :class:`~genlab.data.cameras.CameraReadError`
    for bad cameras; :class:`~genlab.data.images.ImageReadError` for files that are not
    images (``probe_images`` reads the headers only).
    """
    root = Path(root)
    image_dir = root / "images" / object_id
    images = _view_files(image_dir, IMAGE_EXTENSIONS, "image")
    if not images:
        raise MultiViewReadError(image_dir, f"object {object_id!r} has no images")
    views = tuple(sorted(images, key=_natural_key))
    if len(views) < num_views:
        raise MultiViewReadError(
            image_dir,
            f"object {object_id!r} has {len(views)} view{'s' if len(views) != 1 else ''}, "
            f"fewer than num_views={num_views}",
        )
    if cond_view != "random" and cond_view not in images:
        raise MultiViewReadError(image_dir, f"object {object_id!r} has no view {cond_view!r}")
    normals = _matched(root, "normals", object_id, views, IMAGE_EXTENSIONS, "normal map")
    cameras = _matched(root, "cameras", object_id, views, (".json",), "camera")
    masks = _view_files(root / "masks" / object_id, IMAGE_EXTENSIONS, "mask")
    for view, path in masks.items():
        if view not in images:
            raise MultiViewReadError(path, f"mask has no image (no view {view!r} in {image_dir})")
    if probe_images:
        for path in [*(images[v] for v in views), *normals, *masks.values()]:
            _probe_image(path)
    return MultiViewObject(
        object_id=object_id,
        views=views,
        images=tuple(images[v] for v in views),
        normals=tuple(normals),
        masks=tuple(masks.get(v) for v in views),
        cameras=tuple(read_camera_json(path) for path in cameras),
    )


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _view_files(folder: Path, extensions: Iterable[str], kind: str) -> dict[str, Path]:
    """``{view: file}`` of the files with ``extensions`` in ``folder`` ({} when absent)."""
    if not folder.is_dir():
        return {}
    extensions = tuple(extensions)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise MultiViewReadError(
                path, f"two {kind} files for view {path.stem!r} (also {found[path.stem].name})"
            )
        found[path.stem] = path
    return found


def _matched(
    root: Path,
    folder: str,
    object_id: str,
    views: Sequence[str],
    extensions: Sequence[str],
    kind: str,
) -> list[Path]:
    """The ``kind`` file of every view, in view order; extra or missing files raise."""
    directory = root / folder / object_id
    files = _view_files(directory, extensions, kind)
    for view, path in files.items():
        if view not in views:
            raise MultiViewReadError(
                path, f"{kind} has no image (no view {view!r} in {root / 'images' / object_id})"
            )
    for view in views:
        if view not in files:
            raise MultiViewReadError(
                directory / f"{view}{extensions[0]}", f"no {kind} for view {view!r}"
            )
    return [files[v] for v in views]


def _probe_image(path: Path) -> None:
    """Open the image header (no decoding); raise ImageReadError when it is not an image."""
    register_heif()
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with Image.open(path):
            pass
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError(
            path, "not a recognised image format (or a corrupt image header)"
        ) from err
    except Exception as err:  # Pillow's plugins raise many types for damaged headers
        raise ImageReadError(path, f"corrupt image header: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class MultiViewDataset(Dataset):
    """Items of :data:`ITEM_KEYS` (see the module docstring) from scanned objects.

    ``train`` enables the random choices (``cond_view="random"``, ``background="random"``,
    the target offset); they use torch's global generator, so each DataLoader worker draws
    its own. Otherwise every item is the same each time it is loaded. With
    ``on_bad_file="skip"`` an object that fails to load is replaced by the next one and
    recorded in ``skipped`` (``{object_id: error message}``, per process).
    """

    def __init__(
        self,
        objects: Sequence[MultiViewObject],
        image_size: int = 256,
        num_views: int = 6,
        cond_view: str = "random",
        background: str = "white",
        clip_size: int = 224,
        train: bool = False,
        on_bad_file: str = "error",
    ) -> None:
        _check_options(image_size, num_views, background, clip_size)
        self.objects = list(objects)
        self.image_size = image_size
        self.num_views = num_views
        self.cond_view = cond_view
        self.background = background
        self.clip_size = clip_size
        self.train = train
        self.on_bad_file = on_bad_file
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self.objects)):
            obj = self.objects[(index + attempt) % len(self.objects)]
            try:
                return self.load(obj)
            except DataFileError as err:
                if self.on_bad_file != "skip":
                    raise
                if obj.object_id not in self.skipped:
                    log.warning("skipping object %s: %s", obj.object_id, err)
                    self.skipped[obj.object_id] = str(err)
        raise RuntimeError(f"no object of the data set could be loaded ({len(self.skipped)} bad)")

    def target_indices(self, num_available: int) -> list[int]:
        """Indices of the target views among ``num_available`` (random offset in training)."""
        spacing = num_available // self.num_views
        offset = int(torch.randint(spacing, ()).item()) if self.train and spacing > 1 else 0
        return [offset + (i * num_available) // self.num_views for i in range(self.num_views)]

    def load(self, obj: MultiViewObject) -> dict[str, torch.Tensor]:
        """The item of one object."""
        if len(obj.views) < self.num_views:
            raise MultiViewReadError(
                obj.images[0].parent,
                f"object {obj.object_id!r} has {len(obj.views)} views, "
                f"fewer than num_views={self.num_views}",
            )
        targets = self.target_indices(len(obj.views))
        cond = self._cond_index(obj)
        background = self._background()
        loaded: dict[int, tuple[Image.Image, Image.Image]] = {}

        def view(k: int) -> tuple[Image.Image, Image.Image]:
            if k not in loaded:
                loaded[k] = _load_view(obj, k, background)
            return loaded[k]

        n = self.num_views
        cond_image = view(cond)[0]
        image_cond = _to_tensor(resize_to(cond_image, self.image_size)).expand(n, -1, -1, -1)
        clip = _to_tensor(resize_to(cond_image, self.clip_size))
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        clip = ((clip - mean) / std).expand(n, -1, -1, -1)
        image_target = torch.stack(
            [_to_tensor(resize_to(view(k)[0], self.image_size)) for k in targets]
        )
        normal_target = torch.stack(
            [_to_tensor(resize_to(view(k)[1], self.image_size)) for k in targets]
        )
        cond_camera = obj.cameras[cond]
        target_cameras = [obj.cameras[k] for k in targets]
        return {
            "image_cond": image_cond.contiguous(),
            "image_target": image_target,
            "normal_target": normal_target,
            "image_cond_vae": (image_cond * 2.0 - 1.0).contiguous(),
            "image_cond_CLIP": clip.contiguous(),
            "image_target_vae": image_target * 2.0 - 1.0,
            "normal_target_vae": normal_target * 2.0 - 1.0,
            "camera_embed_image": torch.from_numpy(
                camera_embeddings(cond_camera, target_cameras, "image")
            ),
            "camera_embed_normal": torch.from_numpy(
                camera_embeddings(cond_camera, target_cameras, "normal")
            ),
        }

    def _cond_index(self, obj: MultiViewObject) -> int:
        if self.cond_view != "random":
            if self.cond_view not in obj.views:
                raise MultiViewReadError(
                    obj.images[0].parent,
                    f"object {obj.object_id!r} has no view {self.cond_view!r}",
                )
            return obj.views.index(self.cond_view)
        if self.train:
            return int(torch.randint(len(obj.views), ()).item())
        return 0

    def _background(self) -> np.ndarray:
        if self.background == "random":
            if self.train:
                return torch.rand(3, dtype=torch.float64).numpy()
            return np.asarray(BACKGROUNDS["white"])
        return np.asarray(BACKGROUNDS[self.background])


def _check_options(image_size: int, num_views: int, background: str, clip_size: int) -> None:
    if background not in (*BACKGROUNDS, "random"):
        raise ValueError(
            f"background must be one of {[*BACKGROUNDS, 'random']}, got {background!r}"
        )
    for name, value in (
        ("image_size", image_size),
        ("num_views", num_views),
        ("clip_size", clip_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _load_view(
    obj: MultiViewObject, k: int, background: np.ndarray
) -> tuple[Image.Image, Image.Image]:
    """The view's image and normal map composited onto ``background`` (source size, RGB)."""
    image = np.asarray(read_image(obj.images[k], "RGBA"))
    normal = np.asarray(read_image(obj.normals[k], "RGBA"))[..., :3]
    if normal.shape[:2] != image.shape[:2]:
        raise MultiViewReadError(
            obj.normals[k],
            f"normal map is {_size(normal)} but its image {obj.images[k].name} is {_size(image)}",
        )
    mask_path = obj.masks[k]
    if mask_path is not None:
        mask = np.asarray(read_image(mask_path, "L"))
        if mask.shape != image.shape[:2]:
            raise MultiViewReadError(
                mask_path,
                f"mask is {_size(mask)} but its image {obj.images[k].name} is {_size(image)}",
            )
    else:
        mask = image[..., 3]
    alpha = mask.astype(np.float32)[..., None] / 255.0
    bg = np.asarray(background, dtype=np.float32) * 255.0

    def composite(rgb: np.ndarray) -> Image.Image:
        out = rgb[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")

    return composite(image), composite(normal)


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as ``(3, H, W)`` float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class MultiViewDataModule(SeededDataModule):
    """Multi-view objects from ``root``, split by object into train and val, batched.

    The split is drawn with ``split_seed`` over every object folder found (before bad ones
    are dropped), so it does not change when an object turns bad. ``skipped`` lists the
    objects dropped with ``on_bad_file="skip"`` as ``(object_id, error message)``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 256,
        num_views: int = 6,
        cond_view: str = "random",
        background: str = "white",
        clip_size: int = 224,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 4,
        num_workers: int = 0,
        on_bad_file: str = "error",
    ) -> None:
        super().__init__()
        _check_options(image_size, num_views, background, clip_size)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root)
        self.image_size = image_size
        self.num_views = num_views
        self.cond_view = cond_view
        self.background = background
        self.clip_size = clip_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_file = check_bad_file_policy(on_bad_file)
        self.skipped: list[Problem] = []
        self.splits: dict[str, list[str]] = {}
        self.train_dataset: MultiViewDataset | None = None
        self.val_dataset: MultiViewDataset | None = None

    def split_ids(self, object_ids: Sequence[str]) -> dict[str, list[str]]:
        """Deterministic object-level split ``{"train": [...], "val": [...]}`` (sorted ids)."""
        ids = sorted(object_ids)
        order = np.random.default_rng(self.split_seed).permutation(len(ids))
        n_val = 0
        if self.val_fraction > 0 and len(ids) >= 2:
            n_val = min(max(1, round(len(ids) * self.val_fraction)), len(ids) - 1)
        val = sorted(ids[i] for i in order[:n_val])
        train = sorted(ids[i] for i in order[n_val:])
        return {"train": train, "val": val}

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        ids = find_objects(self.root)
        splits = self.split_ids(ids)
        objects: dict[str, MultiViewObject] = {}
        self.skipped = []
        for object_id in ids:
            try:
                objects[object_id] = scan_object(
                    self.root, object_id, self.num_views, self.cond_view
                )
            except DataFileError as err:
                if self.on_bad_file == "error":
                    raise
                self.skipped.append(Problem(object_id, str(err)))
        if self.skipped:
            log.warning(
                "%d of %d objects skipped (data.on_bad_file=skip)", len(self.skipped), len(ids)
            )
        if not objects:
            raise ValueError(f"{self.root}: every object was skipped ({len(self.skipped)})")
        self.splits = {k: [i for i in v if i in objects] for k, v in splits.items()}
        if not self.splits["train"]:
            raise ValueError(
                f"{self.root}: the training split is empty: add objects or lower val_fraction"
            )
        log.info(
            "multi-view data: %d objects, splits %s",
            len(objects),
            {k: len(v) for k, v in self.splits.items()},
        )
        self.train_dataset = self._dataset([objects[i] for i in self.splits["train"]], train=True)
        self.val_dataset = self._dataset([objects[i] for i in self.splits["val"]], train=False)

    def _dataset(self, objects: list[MultiViewObject], train: bool) -> MultiViewDataset:
        return MultiViewDataset(
            objects,
            image_size=self.image_size,
            num_views=self.num_views,
            cond_view=self.cond_view,
            background=self.background,
            clip_size=self.clip_size,
            train=train,
            on_bad_file=self.on_bad_file,
        )

    def split_dataset(self, split: str) -> MultiViewDataset:
        if split not in ("train", "val"):
            raise ValueError(
                f"mvds has splits train and val only, not {split!r}: run with test=false"
            )
        dataset = self.train_dataset if split == "train" else self.val_dataset
        assert dataset is not None, "call setup() first"
        return dataset

    def validate(self) -> ValidationReport:
        """Check every object: its file sets, cameras and every view fully decoded.

        Returns a :class:`~genlab.data.validation.ValidationReport` with the counts
        (objects, views), the split sizes (good objects only) and one problem per bad object
        structure or bad view (its first bad file).
        """
        report = ValidationReport(f"mvds {self.root}")
        ids = find_objects(self.root)
        good: set[str] = set()
        views = 0
        white = np.asarray(BACKGROUNDS["white"])
        for object_id in ids:
            try:
                obj = scan_object(
                    self.root, object_id, self.num_views, self.cond_view, probe_images=False
                )
            except DataFileError as err:
                report.add_error(err)
                continue
            views += len(obj.views)
            indices = range(len(obj.views))
            passed = check_files(
                indices,
                lambda k, obj=obj: _load_view(obj, k, white),
                report,
                desc=f"checking {object_id}",
            )
            if len(passed) == len(indices):
                good.add(object_id)
        report.count("objects", len(ids))
        report.count("views", views)
        for name, members in self.split_ids(ids).items():
            report.split(name, sum(1 for i in members if i in good))
        return report

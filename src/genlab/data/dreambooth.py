"""DreamBooth data: a few dozen photos of one object, learned under an instance token.

:class:`DreamBoothDataModule` reads a folder of photos (PNG/JPEG/WebP/HEIC/HEIF, oriented by
:func:`~genlab.data.images.read_image`), optional per-image captions (``captions.txt``) and an
optional folder of class images for prior preservation. Each photo is decoded once into
``cache_dir`` as a uint8 ``.npy`` whose shorter side is ``resolution``; after that an item is
a memory-mapped crop, an optional flip and a conversion to float. The data folder is never
written. The train/val split (by ``split_seed``) is saved as JSON in ``split_file`` and reused
when that file exists.

Batch keys (``B`` = batch size, ``R`` = resolution):

- ``pixel_values``: (B, 3, R, R) float32 in [-1, 1]
- ``prompt``: list[str], the caption or instance prompt with the placeholders filled
- ``image_id``: list[str], the photo's file name
- ``original_size``: (B, 2) int64, (h, w) of the oriented photo
- ``crop_top_left``: (B, 2) int64, (top, left) of the crop in the image resized to shorter
  side R (after a flip: in the flipped image)
- with ``class_dir`` (train loader only): ``class_pixel_values`` (B, 3, R, R),
  ``class_prompt`` list[str], ``class_original_size`` (B, 2), ``class_crop_top_left`` (B, 2)
  for the class image paired with each item (item ``i`` gets class image ``i mod n``)

The validation loader yields the val split with centre crops and no flip.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from genlab.atomic import write_bytes_atomic
from genlab.data.captions import CaptionError, read_captions_txt
from genlab.data.errors import DataFileError
from genlab.data.images import IMAGE_EXTENSIONS, read_image
from genlab.data.validation import (
    Problem,
    ValidationReport,
    check_bad_file_policy,
    check_files,
    find_duplicates,
)
from genlab.data.voxel_dataset import cache_key

__all__ = [
    "CachedImage",
    "DreamBoothDataModule",
    "DreamBoothDataset",
    "ImageCache",
    "fill_placeholders",
    "list_images",
    "read_split_file",
    "split_names",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CropMode = Literal["center", "random"]
_Skip = Callable[..., None]  # (path, reason, image left out or None)
_Fatal = Callable[[Problem], None]
_SAMPLE_SUFFIXES = ("", " on a beach", " in the snow", " on a wooden table, studio lighting")


def fill_placeholders(text: str, instance_token: str, class_word: str) -> str:
    """Replace ``{instance_token}`` and ``{class_word}``; other braces are left as they are."""
    return text.replace("{instance_token}", instance_token).replace("{class_word}", class_word)


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        for p in folder.iterdir()
    )


def list_images(folder: Path, key: str) -> list[Path]:
    """Image files directly in ``folder`` (hidden files left out), sorted by name.

    Raises :class:`FileNotFoundError` naming ``key`` and the folder when it is missing or
    holds no images.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}={folder}: no such folder")
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise FileNotFoundError(f"{key}={folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded train/val split of ``names`` (each list sorted).

    ``round(n * val_fraction)`` names go to val, at least 1 and at most ``n - 1`` when
    ``val_fraction > 0`` and there are at least 2 names.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(names)
    n_val = 0
    if val_fraction > 0 and len(ordered) >= 2:
        n_val = min(max(1, round(len(ordered) * val_fraction)), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val = {ordered[i] for i in perm[:n_val]}
    return {"train": [n for n in ordered if n not in val], "val": sorted(val)}


def read_split_file(path: Path, present: set[str]) -> dict[str, list[str]]:
    """Read a split written by :class:`DreamBoothDataModule`; every name must be in ``present``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFileError(path, f"invalid JSON: {err.msg}", err.lineno) from None
    except OSError as err:
        raise DataFileError(path, f"cannot read file: {err.strerror or err}") from err
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) and all(isinstance(n, str) for n in data[k])
        for k in ("train", "val")
    ):
        raise DataFileError(path, "expected an object with 'train' and 'val' lists of file names")
    split = {"train": sorted(data["train"]), "val": sorted(data["val"])}
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        raise DataFileError(path, f"names {_listed(both)} in both train and val")
    missing = sorted(set(split["train"] + split["val"]) - present)
    if missing:
        raise DataFileError(
            path,
            f"names {len(missing)} file(s) that are not in the image folder: {_listed(missing)} "
            "(delete the split file to split again)",
        )
    return split


def _write_split_file(path: Path, split: dict[str, list[str]], seed: int, fraction: float) -> None:
    data = {"split_seed": seed, "val_fraction": fraction, **split}
    write_bytes_atomic(path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))


def _listed(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Decoded-image cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedImage:
    """A decoded photo on disk: uint8 (H, W, 3) ``.npy`` with ``min(H, W) == resolution``."""

    array_path: str
    original_size: tuple[int, int]  # (h, w) of the oriented photo


class ImageCache:
    """Decodes each photo once into ``cache_dir``, keyed by path, size, mtime, resolution and background."""

    def __init__(self, cache_dir: Path, resolution: int, background: tuple[int, int, int]) -> None:
        self.cache_dir = cache_dir
        self.resolution = resolution
        self.background = background

    def key(self, path: Path) -> str:
        st = path.stat()
        return cache_key(
            {
                "path": str(path.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "resolution": self.resolution,
                "background": list(self.background),
                "version": CACHE_VERSION,
            }
        )

    def get(self, path: Path) -> CachedImage:
        """The cached image, decoding and writing it first on a miss (raises ``ImageReadError``)."""
        key = self.key(path)
        array_path = self.cache_dir / f"{key}.npy"
        meta_path = self.cache_dir / f"{key}.json"
        if meta_path.is_file() and array_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return CachedImage(str(array_path), tuple(meta["original_size"]))
        img = read_image(path, mode="RGB", background=self.background)
        original = (img.height, img.width)
        array = np.asarray(_resize_shorter_side(img, self.resolution), dtype=np.uint8)
        write_bytes_atomic(
            array_path, _npy_bytes(array)
        )  # the array first: the meta marks completion
        meta = {"file": str(path), "original_size": list(original)}
        write_bytes_atomic(meta_path, json.dumps(meta).encode("utf-8"))
        return CachedImage(str(array_path), original)


def _resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (LANCZOS), keeping the aspect ratio."""
    width, height = img.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new == img.size:
        return img
    return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    image_id: str
    prompt: str
    image: CachedImage


class DreamBoothDataset(Dataset):
    """Crops of cached photos; index ``i`` or ``(i, seed)`` (the seed drives crop and flip).

    ``repeats`` repeats every photo per epoch; item ``i`` is photo ``i mod n`` and, with
    class items, class image ``i mod n_class``.
    """

    def __init__(
        self,
        items: Sequence[_Item],
        resolution: int,
        crop: CropMode = "center",
        flip_prob: float = 0.0,
        repeats: int = 1,
        class_items: Sequence[_Item] = (),
    ) -> None:
        self.items = list(items)
        self.resolution = resolution
        self.crop = crop
        self.flip_prob = flip_prob
        self.repeats = repeats
        self.class_items = list(class_items)

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = np.random.default_rng(seed) if seed is not None else None
        out = self._view(self.items[index % len(self.items)], rng, "")
        if self.class_items:
            out.update(self._view(self.class_items[index % len(self.class_items)], rng, "class_"))
        return out

    def _view(self, item: _Item, rng: np.random.Generator | None, prefix: str) -> dict[str, Any]:
        array = np.load(item.image.array_path, mmap_mode="r")
        height, width = array.shape[:2]
        size = self.resolution
        if self.crop == "random" and rng is not None:
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        view = array[top : top + size, left : left + size]
        if rng is not None and self.flip_prob > 0 and rng.random() < self.flip_prob:
            view = view[:, ::-1]
            left = width - left - size  # the same crop, seen in the flipped image
        # one copy out of the memory map, already (3, R, R); uint8 -> [-1, 1]
        pixels = torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1)))
        out = {
            f"{prefix}pixel_values": pixels.to(torch.float32).div_(127.5).sub_(1.0),
            f"{prefix}prompt": item.prompt,
            f"{prefix}original_size": torch.tensor(item.image.original_size, dtype=torch.int64),
            f"{prefix}crop_top_left": torch.tensor((top, left), dtype=torch.int64),
        }
        if not prefix:
            out["image_id"] = item.image_id
        return out


class _SeededSampler(Sampler[tuple[int, int]]):
    """Each epoch: a permutation and one augmentation seed per item, both from ``generator``."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator).tolist()
        return iter(zip(order, seeds, strict=True))


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What :meth:`DreamBoothDataModule._inspect` found, beyond the report."""

    items: dict[str, _Item] = field(default_factory=dict)
    class_items: list[_Item] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    split_from_file: bool = False
    skippable: list[Problem] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)


class DreamBoothDataModule(pl.LightningDataModule):
    """Photos of one object (plus optional class images) for DreamBooth fine-tuning.

    See the module docstring for the batch keys. ``on_bad_file="error"`` makes :meth:`setup`
    raise with every problem of :meth:`validate`; ``"skip"`` leaves bad images (unreadable,
    duplicate id, caption missing) out, logs them and lists them in :attr:`skipped`. A bad
    captions file or split file and fewer than 2 usable images always raise. The train order
    and augmentation come from the module's own generator, saved in :meth:`state_dict`.
    """

    def __init__(
        self,
        instance_dir: str | os.PathLike[str],
        captions_file: str | os.PathLike[str] | None = None,
        instance_token: str = "sksToy",
        class_word: str = "toy",
        instance_prompt: str = "a photo of {instance_token} {class_word}",
        use_captions: bool = False,
        class_dir: str | os.PathLike[str] | None = None,
        class_prompt: str = "a photo of {class_word}",
        num_class_images: int = 100,
        resolution: int = 512,
        crop: CropMode = "random",
        random_flip: float = 0.0,
        background: Sequence[int] = (255, 255, 255),
        val_fraction: float = 0.2,
        split_seed: int = 0,
        split_file: str | os.PathLike[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        on_bad_file: str = "error",
        max_train_samples: int | None = None,
        repeats: int = 1,
        sample_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not 0 <= random_flip <= 1:
            raise ValueError(f"random_flip is a probability in [0, 1], got {random_flip}")
        if resolution <= 0 or repeats < 1 or num_class_images < 1:
            raise ValueError(
                f"resolution, repeats and num_class_images must be positive, got "
                f"{resolution}, {repeats}, {num_class_images}"
            )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.instance_dir = Path(instance_dir).expanduser()
        self.captions_file = (
            Path(captions_file).expanduser()
            if captions_file
            else self.instance_dir / "captions.txt"
        )
        self.instance_token = instance_token
        self.class_word = class_word
        self.instance_prompt = self._fill(instance_prompt)
        self.use_captions = bool(use_captions)
        self.class_dir = Path(class_dir).expanduser() if class_dir else None
        self.class_prompt = self._fill(class_prompt)
        self.num_class_images = int(num_class_images)
        self.resolution = int(resolution)
        self.crop: CropMode = crop
        self.random_flip = float(random_flip)
        self.background = tuple(int(c) for c in background)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        default_cache = Path(os.environ.get("GENLAB_CACHE_DIR", ".cache/genlab")) / "dreambooth"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache
        self.on_bad_file = check_bad_file_policy(on_bad_file)
        self.max_train_samples = max_train_samples
        self.repeats = int(repeats)
        self._sample_prompts = [self._fill(p) for p in sample_prompts] if sample_prompts else None
        for name, path in (("cache_dir", self.cache_dir), ("split_file", self.split_file)):
            if path is not None and _is_inside(path, self.instance_dir):
                raise ValueError(
                    f"{name}={path} is inside instance_dir={self.instance_dir}: "
                    "the data folder is never written"
                )
        self._cache = ImageCache(self.cache_dir, self.resolution, self.background)  # type: ignore[arg-type]
        self.skipped: list[Problem] = []
        self.splits: dict[str, list[str]] = {}
        self._items: dict[str, _Item] = {}
        self._class_items: list[_Item] = []
        self._train_generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)

    def _fill(self, text: str) -> str:
        return fill_placeholders(text, self.instance_token, self.class_word)

    # ---------------------------------------------------------------------------- checking

    def validate(self) -> ValidationReport:
        """Counts, split sizes and every problem of the data set.

        Photos not in the cache yet are decoded (and cached) on the way; ``captions`` is
        counted with ``use_captions``, ``class images`` with ``class_dir``.

        Raises :class:`FileNotFoundError` when ``instance_dir`` (or ``class_dir``) is missing
        or holds no images.
        """
        return self._inspect(require_class_images=False)[0]

    def _inspect(self, require_class_images: bool = True) -> tuple[ValidationReport, _Plan]:
        report = ValidationReport(f"dreambooth {self.instance_dir}")
        plan = _Plan()
        paths = list_images(self.instance_dir, "data.instance_dir")
        report.count("images", len(paths))
        left_out: set[Path] = set()

        def skip(path: Path | str, reason: str, image: Path | None = None) -> None:
            problem = Problem(str(path), reason)
            report.problems.append(problem)
            plan.skippable.append(problem)
            if image is not None:
                left_out.add(image)

        def fatal(problem: Problem) -> None:
            report.problems.append(problem)
            plan.fatal.append(problem)

        for stem in find_duplicates(p.stem for p in paths):
            first, *others = (p for p in paths if p.stem == stem)
            for path in others:
                skip(path, f"duplicate id {stem!r}: same name stem as {first.name}", path)

        prompts = self._prompts(paths, report, skip, fatal)

        cached: dict[Path, CachedImage] = {}
        decoded = ValidationReport(report.dataset)
        check_files(
            paths,
            lambda p: cached.__setitem__(p, self._cache.get(p)),
            decoded,
            desc="caching instance images",
        )
        for problem in decoded.problems:
            skip(problem.path, problem.reason, Path(problem.path))

        if self.class_dir is not None:
            plan.class_items = self._class_items_checked(
                report, skip, fatal, required=require_class_images
            )

        usable = [p for p in paths if p in cached and p not in left_out and p.name in prompts]
        plan.items = {p.name: _Item(p.name, prompts[p.name], cached[p]) for p in usable}
        if len(usable) < 2:
            fatal(
                Problem(
                    str(self.instance_dir),
                    f"fewer than 2 usable images ({len(usable)} of {len(paths)}); "
                    "a train/val split needs at least 2",
                )
            )
        plan.split = self._split(paths, list(plan.items), plan, fatal)
        report.split("train", len(plan.split["train"]))
        report.split("val", len(plan.split["val"]))
        return report, plan

    def _prompts(
        self, paths: list[Path], report: ValidationReport, skip: _Skip, fatal: _Fatal
    ) -> dict[str, str]:
        """Prompt per file name: the instance prompt, or the caption from the captions file."""
        if not self.use_captions:
            return {p.name: self.instance_prompt for p in paths}
        try:
            captions = read_captions_txt(self.captions_file, [p.name for p in paths])
        except CaptionError as err:
            where = err.path if err.line is None else f"{err.path}:{err.line}"
            fatal(Problem(where, err.problem))
            # setup() will raise; the instance prompt lets the other checks go on
            return {p.name: self.instance_prompt for p in paths}
        report.count("captions", len(captions))
        prompts: dict[str, str] = {}
        for path in paths:
            caption = captions.get(path.name, captions.get(path.stem))
            if caption is None:
                skip(path, f"caption missing in {self.captions_file.name}", path)
            else:
                prompts[path.name] = self._fill(caption)
        known = {p.name for p in paths} | {p.stem for p in paths}
        for key in captions:
            if key not in known:
                skip(self.captions_file, f"caption for {key!r}, a file that does not exist")
        without_token = [n for n, text in prompts.items() if self.instance_token not in text]
        if without_token:
            log.warning(
                "%d caption(s) do not mention the instance token %r: %s",
                len(without_token),
                self.instance_token,
                _listed(without_token),
            )
        return prompts

    def _class_items_checked(
        self, report: ValidationReport, skip: _Skip, fatal: _Fatal, required: bool = True
    ) -> list[_Item]:
        """The class images; before ``setup`` (``required=False``) the folder may still be missing
        or empty: prior preservation generates them in the model's ``prepare_data``, which
        Lightning runs after the datamodule's and before ``setup``."""
        assert self.class_dir is not None
        if not required and not _has_images(self.class_dir):
            report.count("class images", 0)
            log.info(
                "data.class_dir=%s has no images yet: they must be generated before setup "
                "(model.prior_preservation) or put there",
                self.class_dir,
            )
            return []
        found = list_images(self.class_dir, "data.class_dir")
        paths = found[: self.num_class_images]
        report.count("class images", len(paths))
        if len(found) < self.num_class_images:
            log.warning(
                "class_dir has %d images, fewer than num_class_images=%d",
                len(found),
                self.num_class_images,
            )
        cached: dict[Path, CachedImage] = {}
        decoded = ValidationReport(report.dataset)
        check_files(
            paths,
            lambda p: cached.__setitem__(p, self._cache.get(p)),
            decoded,
            desc="caching class images",
        )
        for problem in decoded.problems:
            skip(problem.path, problem.reason)
        if not cached:
            fatal(Problem(str(self.class_dir), "no usable class images"))
        return [_Item(p.name, self.class_prompt, cached[p]) for p in paths if p in cached]

    def _split(
        self, paths: list[Path], usable: list[str], plan: _Plan, fatal: _Fatal
    ) -> dict[str, list[str]]:
        if self.split_file is None or not self.split_file.exists():
            return split_names(usable, self.val_fraction, self.split_seed)
        try:
            split = read_split_file(self.split_file, {p.name for p in paths})
        except DataFileError as err:
            where = err.path if err.line is None else f"{err.path}:{err.line}"
            fatal(Problem(where, err.problem))
            return {"train": [], "val": []}
        plan.split_from_file = True
        named = set(split["train"]) | set(split["val"])
        new = sorted(set(usable) - named)
        if new:
            log.warning(
                "%d image(s) are not in the split file %s and are left out: %s",
                len(new),
                self.split_file,
                _listed(new),
            )
        ok = set(usable)
        return {k: [n for n in names if n in ok] for k, names in split.items()}

    # ---------------------------------------------------------------------------- Lightning

    def prepare_data(self) -> None:
        """Decode every uncached photo into the cache (one process, with a progress bar)."""
        self.validate()

    def setup(self, stage: str | None = None) -> None:
        if self._items:
            return
        report, plan = self._inspect()
        if self.on_bad_file == "error":
            report.raise_if_bad()
        elif plan.fatal:
            ValidationReport(report.dataset, report.counts, report.splits, plan.fatal).raise_if_bad(
                "these problems cannot be skipped"
            )
        for problem in plan.skippable:
            log.warning("skipping %s", problem)
        self.skipped = list(plan.skippable)
        split = plan.split
        if self.split_file is not None and not plan.split_from_file:
            _write_split_file(self.split_file, split, self.split_seed, self.val_fraction)
        train = split["train"]
        if self.max_train_samples is not None and self.max_train_samples < len(train):
            train = sorted(random.Random(self.split_seed).sample(train, self.max_train_samples))
        self.splits = {"train": train, "val": list(split["val"])}
        self._items = plan.items
        self._class_items = plan.class_items
        log.info(
            "dreambooth data: %s; train %d, val %d%s",
            ", ".join(f"{v} {k}" for k, v in report.counts.items()),
            len(train),
            len(split["val"]),
            f", {len(self.skipped)} skipped" if self.skipped else "",
        )

    def _dataset(self, split: str) -> DreamBoothDataset:
        if not self._items:
            raise RuntimeError("call setup() first")
        items = [self._items[n] for n in self.splits[split]]
        if split == "train":
            return DreamBoothDataset(
                items,
                self.resolution,
                self.crop,
                self.random_flip,
                self.repeats,
                self._class_items,
            )
        return DreamBoothDataset(items, self.resolution, "center")

    def _loader(self, dataset: DreamBoothDataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        return self._loader(dataset, _SeededSampler(len(dataset), self._train_generator))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), None)

    @property
    def sample_prompts(self) -> list[str]:
        """Prompts for preview images: the configured ones, else the instance prompt in a few scenes."""
        if self._sample_prompts:
            return list(self._sample_prompts)
        return [self.instance_prompt + suffix for suffix in _SAMPLE_SUFFIXES]

    def state_dict(self) -> dict[str, Any]:
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_generator.set_state(state_dict["train_generator"])


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())

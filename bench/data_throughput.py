"""Data-loading throughput against plain references measured in the same run.

- images: genlab's ``read_image`` + ``resize_to(512)`` on phone HEICs (decode, orientation,
  8-bit, resize) against a plain PIL resize of an already-decoded JPEG of the same size;
- meshes: genlab's solid voxelisation at 64^3 against trimesh's own voxelizer
  (``mesh.voxelized(pitch).fill()``) on the same normalised meshes;
- loader: the ``sks_toy`` DreamBooth train loader (photos decoded once into the cache, then
  crop + tensor per item) against a plain Dataset that decodes and resizes the photo on every
  item, both through a DataLoader with the same workers and batch size.

    python bench/data_throughput.py [--repeats 3] [--resolution 64] [--size 512] [--workers 8]

Each part prints items/s for both sides and its ratio (time ours / time reference, lower is
better); the last line, ``ratio: <number>``, is the geometric mean of the three ratios.
Uses ../shared/testdata when present (real HEICs and meshes), else generated stand-ins.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from genlab.data.images import read_image, resize_to
from genlab.data.meshes import load_mesh, normalize_to_unit_cube
from genlab.geometry.voxelize import voxelize_mesh

TESTDATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "testdata"


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def heic_files(tmp: Path) -> list[Path]:
    real = sorted((TESTDATA / "pillow_heif").glob("heif_other_*.heic")) if TESTDATA.is_dir() else []
    real = [p for p in real if p.stat().st_size > 100_000]
    if real:
        return real
    from pillow_heif import register_heif_opener

    register_heif_opener()
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):  # smooth noise, phone-sized
        small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        path = tmp / f"photo_{i}.heic"
        Image.fromarray(small).resize((4032, 3024), Image.BICUBIC).save(path, quality=80)
        out.append(path)
    return out


def bench_images(size: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        files = heic_files(Path(tmp))
        decoded = [read_image(p) for p in files]
        # reference: the same pictures as JPEG, decoded beforehand; only PIL's resize is timed
        jpegs = []
        for img in decoded:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            jpegs.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        ours = best_time(lambda: [resize_to(read_image(p), size) for p in files], repeats)
        ref = best_time(lambda: [resize_to(j, size) for j in jpegs], repeats)
    n = len(files)
    print(f"images: {n} HEIC ({decoded[0].size[0]}x{decoded[0].size[1]} ...) -> {size}^2")
    print(f"  genlab read_image + resize_to : {n / ours:8.2f} images/s")
    print(f"  PIL resize of decoded JPEG    : {n / ref:8.2f} images/s")
    print(f"  images ratio: {ours / ref:.3f}")
    return ours / ref


def meshes() -> list[trimesh.Trimesh]:
    names = ["ballA.off", "sphere.ply", "featuretype.ply", "bunny.ply", "7_8ths_cube.stl"]
    if TESTDATA.is_dir():
        found = [TESTDATA / "trimesh" / n for n in names if (TESTDATA / "trimesh" / n).is_file()]
        if found:
            return [load_mesh(p) for p in found]
    return [trimesh.creation.icosphere(4), trimesh.creation.torus(1.0, 0.3), trimesh.creation.box()]


def bench_voxels(resolution: int, repeats: int) -> float:
    ms = [normalize_to_unit_cube(m, margin=1.0 / resolution) for m in meshes()]
    pitch = 1.0 / resolution
    ours = best_time(lambda: [voxelize_mesh(m, resolution, fill=True) for m in ms], repeats)
    ref = best_time(lambda: [m.voxelized(pitch).fill() for m in ms], repeats)
    faces = sum(len(m.faces) for m in ms)
    print(f"meshes: {len(ms)} meshes, {faces} faces in all, solid voxelisation at {resolution}^3")
    print(f"  genlab voxelize_mesh          : {len(ms) / ours:8.2f} meshes/s")
    print(f"  trimesh voxelized().fill()    : {len(ms) / ref:8.2f} meshes/s")
    print(f"  voxelise ratio: {ours / ref:.3f}")
    return ours / ref


class _DecodeEveryItem(torch.utils.data.Dataset):
    """The plain reference: decode, orient, resize and convert the photo on every access."""

    def __init__(self, files: list[Path], size: int, length: int) -> None:
        self.files, self.size, self.length = files, size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        img = resize_to(read_image(self.files[i % len(self.files)]), self.size)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0


def _photo_folder(folder: Path, tmp: Path, count: int) -> list[Path]:
    """``count`` photos (real phone HEICs and JPEGs, repeated under new names) in ``folder``."""
    sources = heic_files(tmp)
    backpack = TESTDATA / "dreambooth_backpack"
    if backpack.is_dir():
        sources += sorted(backpack.glob("*.jpg"))
    folder.mkdir(parents=True)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"photo_{i:03d}{src.suffix.lower()}"
        dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out


def _images_per_second(loader: torch.utils.data.DataLoader, batches: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch out of the way
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(
            next(it)[0]
            if isinstance(loader.dataset, _DecodeEveryItem)
            else next(it)["pixel_values"]
        )
    return n / (time.perf_counter() - t)


def bench_loader(size: int, workers: int, batch_size: int = 4, batches: int = 24) -> float:
    from genlab.data.dreambooth import DreamBoothDataModule

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = _photo_folder(tmp / "photos", tmp, 24)
        dm = DreamBoothDataModule(
            tmp / "photos", resolution=size, crop="random", batch_size=batch_size,
            num_workers=workers, cache_dir=tmp / "cache", split_file=tmp / "split.json",
            repeats=64,
        )  # fmt: skip
        t = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        prepare_s = time.perf_counter() - t
        ours = _images_per_second(dm.train_dataloader(), batches)
        ref_loader = torch.utils.data.DataLoader(
            _DecodeEveryItem(files, size, 10_000), batch_size=batch_size, shuffle=True,
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip
        ref = _images_per_second(ref_loader, max(2, batches // 8))
    print(
        f"loader: {len(files)} photos (HEIC + JPEG) -> {size}^2, batch {batch_size}, {workers} workers"
    )
    print(
        f"  genlab sks_toy train loader   : {ours:8.1f} images/s (one-off decode into the cache: {prepare_s:.1f} s)"
    )
    print(f"  decode + resize every item    : {ref:8.1f} images/s")
    print(f"  loader ratio: {ref / ours:.3f}")
    return ref / ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args()
    r_img = bench_images(args.size, args.repeats)
    r_vox = bench_voxels(args.resolution, args.repeats)
    r_load = bench_loader(args.size, args.workers)
    print(f"ratio: {(r_img * r_vox * r_load) ** (1 / 3):.3f}")


if __name__ == "__main__":
    main()

"""Export the synthetic shapes as an Objaverse/Shap-E style folder (meshes, points, renders).

The Objaverse/Shap-E layout
---------------------------
The 3-D methods read objects from one folder (``genlab.data.objaverse`` reads it)::

    <root>/images/<object_id>/<view>.png     renders, RGBA (alpha = mask); any count of views
                                             (60 recommended)
    <root>/normals/<object_id>/<view>.png    optional world-space normal maps, RGBA,
                                             rgb = (n * 0.5 + 0.5) * 255 (multi-view diffusion)
    <root>/cameras/<object_id>/<view>.json   optional per-view cameras (genlab.data.cameras JSON)
    <root>/points/<object_id>.npy|.ply       point cloud (N, 3), or (N, 6) with colours
    <root>/meshes/<object_id>.obj|.glb|...   optional source mesh
    <root>/latents/<object_id>.pt|.npy       optional precomputed latents
    <root>/captions.csv                      object_id,caption (text models)
    <root>/metadata.json                     image <-> object links (image models)

``<view>`` is any file stem (``000``, ``001``, ...); the same stem links an image, its normal
map and its camera. ``metadata.json`` is ``{"images": [{"file_name": "images/<id>/<view>.png",
"object_id": "<id>", ...}, ...]}`` (or the plain mapping ``{"images/<id>/<view>.png": "<id>"}``,
see :func:`genlab.data.captions.read_metadata_json`); file names are relative to ``<root>``.

What the export writes
----------------------
For each shape of :func:`genlab.data.synthetic_shapes.generate` (object ids
``<class>_<index:04d>``, e.g. ``sphere_0003``):

- ``meshes/<id>.obj``: the marching-cubes mesh of its grid, inside the unit cube
  ``[-0.5, 0.5]^3`` (world z up);
- ``points/<id>.npy``: ``float32 (num_points, 6)``, surface samples and the object's colour
  (one RGB per object, multiples of 1/255 in [0, 1]);
- ``images``, ``normals``, ``cameras``: ``num_views`` views on an orbit around the origin at
  ``camera_distance``: azimuths evenly spread, ``azimuth_v = 360 * v / num_views`` degrees, and
  elevations varying along the orbit, ``elevation_v = 20 + 15 * sin(2 pi v / num_views)``
  degrees (5 to 35); renders are shaded in the object's colour, RGBA with alpha = mask;
- ``captions.csv`` (the synthetic captions, "a large torus on the left") and ``metadata.json``
  (one record per image with its normal map, camera and view, plus the export parameters);
  with ``styles=True`` captions.csv has a third column ``style``: a Turkish style phrase
  from :data:`STYLE_PHRASES` picked by the object's index (every sixth object has none).

The same arguments give byte-identical files (no timestamps, fixed formatting, sorted JSON
keys), so a DVC hash of the folder is stable. The folder is built in a temporary sibling and
renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from genlab.data.cameras import Camera, look_at_camera, write_camera_json
from genlab.data.synthetic_shapes import SHAPES, generate
from genlab.geometry.marching_cubes import extract_mesh
from genlab.geometry.mesh_io import save_mesh
from genlab.geometry.rasterize import render_view
from genlab.geometry.surface import sample_surface

__all__ = ["DEFAULT_CLASSES", "STYLE_PHRASES", "export_objaverse_layout", "orbit_cameras"]

DEFAULT_CLASSES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "torus")
EXPORT_VERSION = 1
#: Style descriptions written with ``styles=True`` (object ``n`` gets ``STYLE_PHRASES[n % 6]``;
#: the empty entry leaves an object without style).
STYLE_PHRASES: tuple[str, ...] = (
    "Selçuklu geometrik yıldız deseni",
    "İznik çini motifleri, kobalt mavisi",
    "Osmanlı lale ve karanfil deseni",
    "Anadolu kilim motifi",
    "ebru desenli yüzey",
    "",
)


def orbit_cameras(num_views: int, distance: float, fov_deg: float, image_size: int) -> list[Camera]:
    """The export's views: azimuth ``360 v / n``, elevation ``20 + 15 sin(2 pi v / n)`` degrees."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    cameras = []
    for v in range(num_views):
        elevation = 20.0 + 15.0 * math.sin(2.0 * math.pi * v / num_views)
        azimuth = 360.0 * v / num_views
        cameras.append(
            look_at_camera(elevation, azimuth, distance, fov_deg, image_size, image_size)
        )
    return cameras


def export_objaverse_layout(
    out_dir: str | os.PathLike[str],
    classes: Sequence[str] = DEFAULT_CLASSES,
    num_per_class: int = 10,
    voxel_size: int = 32,
    seed: int = 0,
    num_views: int = 8,
    image_size: int = 128,
    num_points: int = 4096,
    camera_distance: float = 2.0,
    fov_deg: float = 40.0,
    overwrite: bool = False,
    styles: bool = False,
) -> Path:
    """Write the synthetic shapes in the Objaverse/Shap-E layout (module docstring) to ``out_dir``.

    Refuses (``FileExistsError``) a non-empty ``out_dir`` unless ``overwrite``; the folder only
    appears, complete, at the end. ``styles`` adds the ``style`` column to captions.csv.
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}, expected some of {sorted(SHAPES)}")
    if num_per_class < 1 or num_points < 1 or image_size < 1:
        raise ValueError("num_per_class, num_points and image_size must be >= 1")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace it)")
    cameras = orbit_cameras(num_views, camera_distance, fov_deg, image_size)
    params = {
        "classes": list(classes),
        "num_per_class": int(num_per_class),
        "voxel_size": int(voxel_size),
        "seed": int(seed),
        "num_views": int(num_views),
        "image_size": int(image_size),
        "num_points": int(num_points),
        "camera_distance": float(camera_distance),
        "fov_deg": float(fov_deg),
        "version": EXPORT_VERSION,
    }
    if styles:  # only then, so the files of existing exports stay byte-identical
        params["styles"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_all(tmp, params, cameras)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_all(root: Path, params: dict, cameras: list[Camera]) -> None:
    data = generate(
        params["classes"], params["num_per_class"], params["voxel_size"], params["seed"]
    )
    counters = dict.fromkeys(params["classes"], 0)
    captions: list[tuple[str, ...]] = []
    records: list[dict[str, str]] = []
    views = [f"{v:03d}" for v in range(len(cameras))]
    items = list(zip(data.voxels, data.captions, data.labels, strict=True))
    for n, (grid, caption, label) in enumerate(tqdm(items, desc="exporting", unit="object")):
        name = data.class_names[int(label)]
        object_id = f"{name}_{counters[name]:04d}"
        counters[name] += 1
        rng = np.random.default_rng([params["seed"], n])
        color = rng.integers(64, 240, size=3)
        _write_object(root, object_id, grid, color, int(rng.integers(2**31)), params, cameras)
        style = (STYLE_PHRASES[n % len(STYLE_PHRASES)],) if params.get("styles") else ()
        captions.append((object_id, caption, *style))
        for view in views:
            records.append(
                {
                    "file_name": f"images/{object_id}/{view}.png",
                    "normal_file_name": f"normals/{object_id}/{view}.png",
                    "camera_file_name": f"cameras/{object_id}/{view}.json",
                    "object_id": object_id,
                    "view": view,
                }
            )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["object_id", "caption", *(["style"] if params.get("styles") else [])])
    writer.writerows(captions)
    (root / "captions.csv").write_text(buffer.getvalue(), encoding="utf-8")
    metadata = {"generator": {"name": "genlab.data.synthetic_export", **params}, "images": records}
    text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (root / "metadata.json").write_text(text, encoding="utf-8")


def _write_object(
    root: Path,
    object_id: str,
    grid: np.ndarray,
    color: np.ndarray,
    sample_seed: int,
    params: dict,
    cameras: list[Camera],
) -> None:
    mesh = extract_mesh(grid.astype(np.float32))
    if mesh is None:  # pragma: no cover - generate() never makes an empty grid
        raise ValueError(f"{object_id}: the grid has no surface")
    save_mesh(mesh, root / "meshes" / f"{object_id}.obj")
    points, _ = sample_surface(mesh, params["num_points"], seed=sample_seed)
    colors = np.broadcast_to(color.astype(np.float32) / 255.0, points.shape)
    cloud = np.concatenate([points, colors], axis=1).astype(np.float32)
    (root / "points").mkdir(exist_ok=True)
    np.save(root / "points" / f"{object_id}.npy", cloud, allow_pickle=False)
    rgb = tuple(int(c) for c in color)
    for v, camera in enumerate(cameras):
        view = f"{v:03d}"
        rendered = render_view(mesh, camera, color=rgb)
        _save_png(rendered.rgba(), root / "images" / object_id / f"{view}.png")
        _save_png(rendered.normal_rgba(), root / "normals" / object_id / f"{view}.png")
        write_camera_json(camera, root / "cameras" / object_id / f"{view}.json")


def _save_png(array: np.ndarray, path: Path) -> None:
    """Save an (H, W, 4) uint8 array as a PNG with no metadata chunks (stable bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        path, format="PNG", compress_level=6
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing ``out`` (moved aside, then deleted)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    with contextlib.suppress(OSError):
        out.rmdir()  # empty: just replace it
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

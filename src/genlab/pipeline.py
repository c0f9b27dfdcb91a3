"""The stages of the DVC pipeline (``dvc.yaml``): ``prepare`` and ``evaluate`` (``train`` is ``train.py``).

Every stage reads ``params.yaml``, the composition of ``conf/pipeline.yaml`` (DVC writes it for
``dvc exp run -S key=value``; ``genlab-data params`` writes it for plain ``dvc repro``), so the
Hydra config tree is the only source of the parameters. Run a stage by hand with
``python -m genlab.pipeline prepare|evaluate [--params params.yaml]``.

``prepare`` depends on ``data/raw.version`` (a link to ``data.dvc``: DVC refuses ``.dvc`` files as
dependencies), not on ``data/raw`` itself, so it reruns whenever the tracked data version
changes, and a fresh clone without the raw data still runs: the stage gets the data through
:class:`~genlab.data.data_manager.DataManager` (``dvc pull`` -> known data set / generator).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"
DVC_DATA_FILE = "data.dvc"
_CLASS_OF_ID = re.compile(r"^(?P<cls>.+?)_\d+$")


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    """``params.yaml`` as a config (already resolved by the composition)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no parameters file (write it with `genlab-data params`)")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def compose_params(
    out: str | Path = PARAMS_FILE,
    overrides: Sequence[str] = (),
    config_dir: str | Path = "conf",
    config_name: str = "pipeline",
) -> Path:
    """Write ``params.yaml`` exactly as ``dvc exp run`` does (DVC's own Hydra composition)."""
    from dvc.utils.hydra import compose_and_dump

    out = Path(out)
    compose_and_dump(out, str(Path(config_dir).resolve()), None, config_name, ".", list(overrides))
    return out


# ---- raw data ---------------------------------------------------------------------------------
def ensure_raw_data(params: DictConfig, repo_root: Path = Path(".")) -> Path:
    """The raw data folder, pulled with DVC or, failing that, fetched / generated."""
    from genlab.data.data_manager import DataManager

    fetch = params.fetch
    target = (repo_root / fetch.raw_dir / fetch.dataset).resolve()
    manager = DataManager(
        data_dir=Path(params.paths.data_dir),
        repo_root=repo_root,
        cache_dir=Path(params.paths.cache_dir),
    )
    dvc_file = repo_root / DVC_DATA_FILE
    tracked = dvc_file.is_file() and (repo_root / ".dvc").is_dir()
    path = manager.ensure(
        fetch.dataset,
        target,
        dvc_target=DVC_DATA_FILE if tracked else None,
        fallback=_fallback_for(fetch, manager),
    )
    if tracked:
        _sync_with_dvc(repo_root)
    return path


def _sync_with_dvc(repo_root: Path) -> None:
    """Cache data that matches ``data.dvc`` (so ``dvc push`` has it); warn when it does not."""
    from dvc.repo import Repo

    with Repo(str(repo_root.resolve())) as repo:
        target = str((repo_root / DVC_DATA_FILE).resolve())
        changes = repo.status(targets=[target]).get(DVC_DATA_FILE, [])
        states = {
            state
            for change in changes
            if isinstance(change, dict)
            for state in change.get("changed outs", {}).values()
        }
        if not states:
            return
        if states == {"not in cache"}:
            repo.commit(target, force=True)
            log.info("raw data matches %s; stored it in the DVC cache", DVC_DATA_FILE)
        else:
            log.warning(
                "the raw data differs from the version in %s (%s): run `dvc add data/raw` to "
                "record it, or `dvc checkout %s` to restore the recorded one",
                DVC_DATA_FILE,
                ", ".join(sorted(states)),
                DVC_DATA_FILE,
            )


def _fallback_for(fetch: DictConfig, manager):
    """The synthetic generator for ``synthetic_shapes``, else the known-data-set download."""
    if fetch.dataset != "synthetic_shapes":
        return manager.fetch_fallback(fetch.dataset)

    def generate_synthetic_shapes(target: Path) -> None:
        from genlab.data.synthetic_export import export_objaverse_layout

        export_objaverse_layout(target, **OmegaConf.to_container(fetch.synthetic))

    return generate_synthetic_shapes


# ---- prepare ----------------------------------------------------------------------------------
def prepare(params: DictConfig, repo_root: Path = Path(".")) -> Path:
    """Validate the raw objects, voxelise meshes, resample points, convert images, split, manifest."""
    from genlab.data.objaverse import ObjaverseDataModule
    from genlab.data.validation import write_skip_list

    cfg = params.prepare
    raw = ensure_raw_data(params, repo_root)
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    checker = ObjaverseDataModule(root=str(raw), mode="text", on_bad_file=cfg.on_bad_file)
    report = checker.validate()
    report.write_json(tmp / "report.json")
    log.info("%s", report.summary())
    if cfg.on_bad_file == "error":
        report.raise_if_bad("set prepare.on_bad_file=skip to leave them out")
    write_skip_list(report.problems, tmp / "skipped_files.csv")

    objects = _objects(raw, skip={p.path for p in checker.skipped})
    voxels = _voxelise(objects, int(cfg.voxel_size))
    _resample_points(raw, objects, tmp / "points", int(cfg.num_points), str(cfg.point_sampling))
    _convert_images(raw, objects, tmp / "images", int(cfg.image_size))
    splits = _split(voxels, float(cfg.test_fraction), int(cfg.split_seed))
    voxels.splits = [splits[s] for s in voxels.sources]
    voxels.save(tmp / "voxels.npz")
    (tmp / "splits.json").write_text(
        json.dumps({k: sorted(i for i, s in splits.items() if s == k) for k in ("train", "test")})
    )
    _write_manifest(tmp, raw, OmegaConf.to_container(cfg, resolve=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("prepared %d objects into %s", len(voxels.voxels), out)
    return out


def _objects(raw: Path, skip: set[str]) -> list[tuple[str, str, Path]]:
    """(object id, caption, mesh file) of every usable object, sorted by id."""
    from genlab.data.captions import read_captions_csv
    from genlab.data.meshes import MESH_EXTENSIONS

    captions = read_captions_csv(raw / "captions.csv")
    meshes = {
        p.stem: p
        for p in sorted((raw / "meshes").iterdir())
        if p.suffix.lower() in MESH_EXTENSIONS and p.is_file()
    }
    found = [(i, captions[i], meshes[i]) for i in sorted(meshes) if i in captions and i not in skip]
    if not found:
        raise FileNotFoundError(f"{raw}: no object has both a mesh in meshes/ and a caption")
    return found


def class_of(object_id: str) -> str:
    """``sphere_0003`` -> ``sphere``; ids without a numeric suffix form one class, ``object``."""
    match = _CLASS_OF_ID.match(object_id)
    return match.group("cls") if match else "object"


def _voxelise(objects: list[tuple[str, str, Path]], resolution: int):
    from genlab.data.mesh_folder import voxelize_file
    from genlab.data.voxel_dataset import VoxelSet

    classes = sorted({class_of(i) for i, _, _ in objects})
    grids = [
        voxelize_file(mesh, resolution)
        for _, _, mesh in tqdm(objects, desc=f"voxelising at {resolution}^3", unit="mesh")
    ]
    return VoxelSet(
        np.stack(grids),
        [c for _, c, _ in objects],
        np.asarray([classes.index(class_of(i)) for i, _, _ in objects]),
        classes,
        None,
        [i for i, _, _ in objects],
    )


def _resample_points(
    raw: Path, objects: list[tuple[str, str, Path]], out: Path, count: int, method: str
) -> None:
    from genlab.data.point_clouds import read_point_cloud, resample

    out.mkdir(parents=True, exist_ok=True)
    for object_id, _, _ in tqdm(objects, desc="resampling points", unit="cloud"):
        files = sorted((raw / "points").glob(f"{object_id}.*"))
        if not files:
            continue
        points, colors = read_point_cloud(files[0])
        rng = np.random.default_rng(0)
        picked, picked_colors = resample(points, count, method, rng=rng, colors=colors)
        rows = picked if picked_colors is None else np.concatenate([picked, picked_colors], 1)
        np.save(out / f"{object_id}.npy", rows.astype(np.float32))


def _convert_images(raw: Path, objects: list[tuple[str, str, Path]], out: Path, size: int) -> None:
    """Every view as an 8-bit RGBA PNG (HEIC, 16-bit and rotated photos become plain PNGs)."""
    from genlab.data.images import IMAGE_EXTENSIONS, read_image, resize_to

    for object_id, _, _ in tqdm(objects, desc="converting images", unit="object"):
        folder = raw / "images" / object_id
        if not folder.is_dir():
            continue
        (out / object_id).mkdir(parents=True, exist_ok=True)
        for view in sorted(folder.iterdir()):
            if view.suffix.lower() in IMAGE_EXTENSIONS:
                img = resize_to(read_image(view, mode="RGBA"), size, mode="center_crop")
                img.save(out / object_id / f"{view.stem}.png", optimize=False)


def _split(voxels, test_fraction: float, seed: int) -> dict[str, str]:
    from genlab.data.splits import stratified_split

    parts = stratified_split(voxels.labels, 0.0, test_fraction, seed)
    split = {}
    for name, indices in parts.items():
        for i in indices:
            split[voxels.sources[int(i)]] = "test" if name == "test" else "train"
    return split


def _write_manifest(out: Path, raw: Path, settings: dict[str, Any]) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "source": str(raw),
        "settings": settings,
        "files": {
            str(p.relative_to(out)): {
                "bytes": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for p in files
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


# ---- evaluate ---------------------------------------------------------------------------------
def evaluate(params: DictConfig) -> dict[str, float]:
    """Test the trained weights; write ``metrics.json``, plot data and a sample grid."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from genlab.cli import scalar_metrics, write_json
    from genlab.models.base import load_weights
    from genlab.samples import write_samples

    out = Path(params.evaluate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(params.seed), workers=True)
    train_dir = Path(params.paths.output_dir)
    datamodule = instantiate(params.data)
    model = instantiate(params.model)
    load_weights(model, train_dir / "model.safetensors")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, default_root_dir=str(out),
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = scalar_metrics(trainer.callback_metrics)
    write_json(out / "metrics.json", metrics)

    _training_curve(train_dir / "csv" / "metrics.csv", out / "training.csv")
    samples = model.sample(
        datamodule.sample_prompts,
        int(params.evaluate.num_samples),
        torch.Generator().manual_seed(int(params.seed)),
    )
    _, grid = write_samples(samples, out / "samples")
    shutil.copyfile(grid, out / "samples.png")  # the image `dvc plots show` renders
    log.info("evaluation metrics: %s", json.dumps(metrics, indent=1))
    return metrics


def _training_curve(metrics_csv: Path, out: Path) -> None:
    """Per-epoch validation metrics of the training run, as a CSV that ``dvc plots`` reads."""
    with metrics_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/iou")]
    keys = [
        "epoch",
        "val/iou",
        *sorted(k for k in rows[0] if k.startswith("val/") and k != "val/iou"),
    ]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---- command line -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genlab.pipeline", description=__doc__)
    parser.add_argument("stage", choices=["prepare", "evaluate"])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    params = load_params(args.params)
    if args.stage == "prepare":
        prepare(params)
    else:
        evaluate(params)
    return 0


if __name__ == "__main__":
    sys.exit(main())

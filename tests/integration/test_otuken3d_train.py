"""otuken3d end to end: one epoch of the synthetic recipe, then styled inference to OBJ/PLY/GLB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from genlab.cli import inference, train
from tests.helpers import compose_config

# the CPU recipe (experiment=otuken3d_synthetic) cut to one small epoch on 8^3..16^3 grids
TINY_OTUKEN3D = [
    "experiment=otuken3d_synthetic",
    "model.voxel_sizes=[8,12,16]",
    "model.voxel_size=16",
    "model.grow_schedule=[0,1,2]",
    "model.decoder.channels=[16,8]",
    "model.num_mesh_samples=128",
    "model.mesh_head.subdivisions=1",
    "data.export.num_per_class=4",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_epochs=1",
    "callbacks.samples.every_n_epochs=1",
    "logger=csv",
    "extras.print_config=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("otuken3d")
    cfg = compose_config("train", TINY_OTUKEN3D, tmp)
    metrics = train(cfg)
    return Path(cfg.paths.output_dir), metrics


def test_one_epoch_writes_checkpoint_previews_and_metrics(run: tuple[Path, dict]) -> None:
    out, metrics = run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("val/loss", "val/iou", "val/chamfer", "val/fscore", "test/iou", "train/grad_norm"):
        assert key in on_disk and np.isfinite(on_disk[key]), key
    # FD (tiny DINO) between previews of the predicted and the target validation shapes
    assert np.isfinite(on_disk["val/fid"]) and on_disk["val/fid"] > 0
    assert 0.0 <= on_disk["val/iou"] <= 1.0 and 0.0 <= on_disk["val/fscore"] <= 1.0
    assert on_disk["val/chamfer"] > 0 and on_disk["train/voxel_size"] == 8

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    # frozen T5 and FID extractor: rebuilt, not saved
    assert not any(k.startswith(("text_encoder.", "fid.")) for k in keys)
    for size_index in range(3):  # every size's head exists from the start
        assert f"decoder.heads.{size_index}.weight" in keys
    assert len(ckpt["optimizer_states"]) == 1 and ckpt["lr_schedulers"]
    assert any(k.startswith("EarlyStopping") for k in ckpt["callbacks"])

    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss_chamfer_step", "train/loss_edge_step", "val/iou_text_only"):
        assert col in header, col
    assert any(c.startswith("lr-AdamW") for c in header)

    previews = out / "samples" / "epoch_001"
    with Image.open(previews / "grid.png") as grid:
        assert np.asarray(grid.convert("L")).std() > 1
    assert [p for p in previews.glob("*.png") if p.name != "grid.png"]


def run_inference(ckpt: Path, tmp_path: Path, *extra: str) -> Path:
    cfg = compose_config(
        "inference",
        ["model=otuken3d_tiny", f"ckpt_path={ckpt}", "extras.print_config=false", *extra],
        tmp_path,
    )
    inference(cfg)
    return Path(cfg.paths.output_dir) / "samples"


def test_turkish_prompt_and_styles_to_obj_ply_glb(run: tuple[Path, dict], tmp_path: Path) -> None:
    ckpt = run[0] / "checkpoints" / "last.ckpt"
    prompt = ["prompt='Çini motifli bir vazo'", "voxel_size=16"]
    mixed = run_inference(
        ckpt,
        tmp_path / "mixed",
        *prompt,
        "style='Selçuklu yıldızı'",
        "style_b='kilim deseni'",
        "style_mix=0.5",
    )
    stem = "cini_motifli_bir_vazo_00"  # Ç folded to c in file names
    meshes = {
        fmt: trimesh.load(mixed / f"{stem}.{fmt}", force="mesh", process=False)
        for fmt in ("obj", "ply", "glb")
    }
    counts = {fmt: len(m.vertices) for fmt, m in meshes.items()}
    assert counts["obj"] > 0 and len(set(counts.values())) == 1, counts
    assert np.abs(meshes["ply"].vertices).max() <= 0.5 + 1e-6
    with Image.open(mixed / f"{stem}.png") as im:
        assert im.size == (256, 256)
    assert (mixed / "grid.png").is_file()

    single = run_inference(ckpt, tmp_path / "single", *prompt, "style='Selçuklu yıldızı'")
    assert (single / f"{stem}.ply").read_bytes() != (mixed / f"{stem}.ply").read_bytes()
    # the exported weights (no frozen T5 in them) give the same mesh as the checkpoint
    exported = run_inference(
        run[0] / "model.safetensors", tmp_path / "st", *prompt, "style='Selçuklu yıldızı'"
    )
    assert (exported / f"{stem}.ply").read_bytes() == (single / f"{stem}.ply").read_bytes()
    with pytest.raises(ValueError, match="needs a second style: style_b"):
        run_inference(ckpt, tmp_path / "bad", *prompt, "style_mix=0.5")


def test_points_only_inference_from_a_reference_cloud(
    run: tuple[Path, dict], tmp_path: Path
) -> None:
    ckpt = run[0] / "checkpoints" / "last.ckpt"
    cloud = np.random.default_rng(0).normal(size=(400, 3)) * [3.0, 1.0, 1.0]
    np.save(tmp_path / "reference.npy", cloud)
    with_points = run_inference(
        ckpt, tmp_path / "a", f"reference_points={tmp_path / 'reference.npy'}", "voxel_size=16"
    )
    without = run_inference(ckpt, tmp_path / "b", "voxel_size=16")
    a = trimesh.load(with_points / "unconditional_00.ply", process=False)
    b = trimesh.load(without / "unconditional_00.ply", process=False)
    assert len(a.vertices) > 0
    assert len(a.vertices) != len(b.vertices) or not np.allclose(a.vertices, b.vertices)


def test_inference_builds_no_validation_scorer(run: tuple[Path, dict], tmp_path: Path) -> None:
    """The FD feature extractor is a training-time part: inference leaves it out (nothing to
    load or download), while the trained weights are the run's."""
    from genlab.tasks.model_loading import build_model

    ckpt = run[0] / "checkpoints" / "last.ckpt"
    cfg = compose_config("inference", ["model=otuken3d_tiny", f"ckpt_path={ckpt}"], tmp_path)
    with_fid, without = build_model(cfg), build_model(cfg, without=("fid",))
    assert with_fid.fid is not None and without.fid is None
    a, b = with_fid.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

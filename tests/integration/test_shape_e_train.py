"""Shap-E prior end to end on the synthetic objects: export -> encode -> train -> sample -> mesh files."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import trimesh
from PIL import Image

from genlab.cli import inference, train
from genlab.data.synthetic_export import export_objaverse_layout
from genlab.models.shape_e.encode import build_encoder, encode_folder
from tests.helpers import compose_config

NUM_VIEWS = 4


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic objects in the objaverse layout, with latents from the tiny encoder."""
    root = export_objaverse_layout(
        tmp_path_factory.mktemp("shape_e") / "objects",
        classes=("sphere", "box"),
        num_per_class=3,
        voxel_size=16,
        num_views=2,
        image_size=32,
        num_points=512,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder("shape_e_encoder_tiny", [], None)
    summary = encode_folder(root, encoder, num_points=512)
    assert len(summary.encoded) == 6
    return root


def train_overrides(root: Path, model: str, *extra: str) -> list[str]:
    return [
        f"model={model}",
        "data=synthetic_objaverse",
        f"data.root={root}",
        "data.num_points=512",
        "data.image_size=32",
        "data.val_fraction=0.34",
        "data.test_fraction=0.0",
        "data.batch_size=2",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        f"model.validation.num_views={NUM_VIEWS}",
        "test=false",
        "logger=csv",
        "callbacks.samples=null",
        "extras.print_config=false",
        *extra,
    ]


def test_encode_train_sample_decode_writes_meshes(objects: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", train_overrides(objects, "shape_e_tiny"), tmp_path)
    metrics = train(cfg)
    run = tmp_path / "run"
    # trained on the latents, validated on the val split with every metric finite
    for key in ("train/loss", "val/loss", "val/clip_score", "val/clip_r_precision"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/skipped_steps"] == 0.0
    empty = metrics["val/empty_meshes"]
    if empty < 2:  # Chamfer / F-score only over the non-empty meshes
        assert math.isfinite(metrics["val/chamfer"]) and 0 <= metrics["val/fscore"] <= 1
    # checkpoints hold the prior only (the frozen CLIP, renderer and scorer are rebuilt)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("prior.") for k in ckpt["state_dict"])
    steps = sorted((run / "samples").glob("step_*"))
    assert len(steps) == 2  # one validation per epoch
    with Image.open(steps[-1] / "renders.png") as grid:
        assert grid.width > NUM_VIEWS * 32
    gifs = sorted(steps[-1].glob("*.gif"))
    assert len(gifs) == 2  # the two val objects
    saved = json.loads((steps[-1] / "metrics.json").read_text())
    assert saved["val/clip_score"] == pytest.approx(metrics["val/clip_score"])

    out = tmp_path / "inference"
    inf = compose_config(
        "inference",
        [
            "model=shape_e_tiny",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "prompt=a large sphere in the middle",
            "num_samples=2",
            "guidance_scale=3",
            "num_inference_steps=4",
            "frame_size=32",
            f"num_views={NUM_VIEWS}",
        ],
        out,
    )
    files = inference(inf)
    samples = out / "run" / "samples"
    assert {f.name for f in files} >= {"grid.png", "renders.png"}
    for index in range(2):
        stem = samples / f"a_large_sphere_in_the_middle_{index:02d}"
        with Image.open(f"{stem}.gif") as gif:
            assert gif.n_frames >= 1 and gif.size == (32, 32)
        counts = set()
        for suffix in ("obj", "ply", "glb"):
            mesh = trimesh.load(f"{stem}.{suffix}", force="mesh", process=False)
            assert len(mesh.faces) > 0
            counts.add(len(mesh.vertices))
        assert len(counts) == 1, counts  # the same mesh in the three formats


def test_training_without_latents_says_how_to_make_them(tmp_path: Path) -> None:
    root = export_objaverse_layout(
        tmp_path / "bare",
        classes=("box",),
        num_per_class=3,
        voxel_size=8,
        num_views=1,
        image_size=16,
        num_points=64,
    )
    cfg = compose_config(
        "train", train_overrides(root, "shape_e_tiny", "data.num_points=64"), tmp_path
    )
    with pytest.raises(FileNotFoundError, match=r"latents.*genlab\.models\.shape_e\.encode"):
        train(cfg)


def test_image_prior_trains_and_generates_from_an_image(objects: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        train_overrides(objects, "shape_e_image_tiny", "trainer.max_epochs=1"),
        tmp_path,
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    run = tmp_path / "run"
    view = sorted((objects / "images").glob("*/*.png"))[0]
    out = tmp_path / "inference"
    inf = compose_config(
        "inference",
        [
            "model=shape_e_image_tiny",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"image={view}",
            "num_samples=1",
            "num_inference_steps=2",
            "frame_size=32",
            f"num_views={NUM_VIEWS}",
        ],
        out,
    )
    files = {f.name for f in inference(inf)}
    stem = f"{view.parent.name}_{view.stem}_00"  # e.g. box_0000_000_00
    assert {f"{stem}.obj", f"{stem}.ply", f"{stem}.glb", f"{stem}.gif", "grid.png"} <= files
    with pytest.raises(FileNotFoundError, match="no such file"):
        inference(compose_config("inference", [*_without_image(inf), "image=missing.png"], out))


def _without_image(cfg) -> list[str]:
    return [
        "model=shape_e_image_tiny",
        f"ckpt_path={cfg.ckpt_path}",
        "num_samples=1",
        "num_inference_steps=2",
    ]

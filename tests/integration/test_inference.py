"""``inference.py`` tasks on a tiny trained run: meshes + previews written, reproducible, overrides applied."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from genlab.cli import inference, train
from tests.helpers import TINY_VOXEL, compose_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_config(
        "train",
        [*TINY_VOXEL, "test=false", "callbacks.samples.every_n_epochs=0", "trainer.max_epochs=1"],
        tmp,
    )
    train(cfg)
    return Path(cfg.paths.output_dir)


def run_generate(tmp_path: Path, ckpt: Path, *extra: str) -> Path:
    cfg = compose_config(
        "inference",
        [f"ckpt_path={ckpt}", "num_samples=2", "extras.print_config=false", *extra],
        tmp_path,
    )
    inference(cfg)
    return Path(cfg.paths.output_dir) / "samples"


def test_generate_writes_meshes_previews_and_grid(trained_run: Path, tmp_path: Path) -> None:
    out = run_generate(
        tmp_path / "a",
        trained_run / "checkpoints" / "last.ckpt",
        "prompts=[a sphere,a box]",
        "seed=3",
    )
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "a_box_00.png",
        "a_box_01.png",
        "a_sphere_00.png",
        "a_sphere_01.png",
        "grid.png",
    ]
    with Image.open(out / "a_box_00.png") as im:
        assert im.size == (256, 256) and np.asarray(im.convert("L")).std() > 1
    for obj in out.glob("*.obj"):
        mesh = trimesh.load(obj, process=False)
        assert len(mesh.vertices) > 0 and np.abs(mesh.vertices).max() <= 0.5 + 1e-6
    again = run_generate(
        tmp_path / "b",
        trained_run / "checkpoints" / "last.ckpt",
        "prompts=[a sphere,a box]",
        "seed=3",
    )
    for obj in out.glob("*.obj"):
        assert (again / obj.name).read_bytes() == obj.read_bytes()  # same seed, same meshes


def test_generate_from_safetensors_with_model_override_and_glb(
    trained_run: Path, tmp_path: Path
) -> None:
    out = run_generate(
        tmp_path,
        trained_run / "model.safetensors",
        "prompt=a torus",
        "task.mesh_format=glb",
        "model.mesh_extraction.sigma=0.0",
    )
    assert sorted(p.name for p in out.glob("*.png")) == [
        "a_torus_00.png",
        "a_torus_01.png",
        "grid.png",
    ]
    for glb in out.glob("*.glb"):
        assert len(trimesh.load(glb, force="mesh").faces) > 0


def test_generate_errors_are_clear(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such.ckpt: no such file"):
        run_generate(tmp_path, trained_run / "no_such.ckpt", "prompt=a box")
    with pytest.raises(ValueError, match="either prompt=... or prompts"):
        run_generate(
            tmp_path, trained_run / "checkpoints" / "last.ckpt", "prompt=a box", "prompts=[a cone]"
        )
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt: not a readable checkpoint"):
        run_generate(tmp_path, bad, "prompt=a box")


def test_analyze_text_writes_similarity_csv_and_pca_plot(tmp_path: Path) -> None:
    prompts = ["a sphere", "a large sphere", "a box", "a small box"]
    cfg = compose_config(
        "inference",
        ["task=analyze_text", f"prompts=[{','.join(prompts)}]", "extras.print_config=false"],
        tmp_path,
    )
    files = inference(cfg)
    rows = list(csv.reader(files["similarity"].open()))
    assert rows[0] == ["prompt", *prompts]
    sim = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert np.allclose(np.diag(sim), 1.0, atol=1e-3) and np.allclose(sim, sim.T, atol=1e-4)
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 2]
    with Image.open(files["pca"]) as im:
        assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 5
    with pytest.raises(ValueError, match="at least two prompts"):
        inference(compose_config("inference", ["task=analyze_text", "prompts=[a box]"], tmp_path))

"""End to end: ``train`` with ``model=mv_diffusion_tiny data=mvds`` on an exported synthetic
multi-view data set, then ``inference.py task=generate_views`` on the trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.cli import inference, train
from genlab.data.synthetic_export import export_objaverse_layout
from tests.helpers import compose_config

NUM_VIEWS = 4
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("mv_run")
    data = export_objaverse_layout(
        tmp / "data",
        classes=("sphere", "box"),
        num_per_class=2,
        voxel_size=16,
        num_views=8,
        image_size=SIZE,
        num_points=64,
    )
    cfg = compose_config(
        "train",
        [
            "model=mv_diffusion_tiny",
            "data=mvds",
            f"data.root={data}",
            f"data.image_size={SIZE}",
            f"data.num_views={NUM_VIEWS}",
            "data.batch_size=2",
            "data.val_fraction=0.25",
            "model.num_inference_steps=2",
            "model.lpips=false",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "test=false",
            "extras.print_config=false",
        ],
        tmp,
    )
    metrics = train(cfg)
    return Path(cfg.paths.output_dir), metrics


def test_train_writes_validation_views_metrics_and_slim_checkpoints(mv_run) -> None:
    run, metrics = mv_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("val/loss", "val/psnr_rgb", "val/ssim_rgb", "val/psnr_normal", "val/ssim_normal"):
        assert key in on_disk and np.isfinite(on_disk[key]), key
    assert np.isfinite(on_disk["train/loss_epoch"])
    assert 0 < on_disk["val/psnr_rgb"] < 60 and -1 <= on_disk["val/ssim_normal"] <= 1

    steps = sorted(p.name for p in (run / "samples").glob("step_*"))
    assert steps == ["step_000002"]
    out = run / "samples" / "step_000002"
    rgb = sorted(out.glob("obj00_rgb_*.png"))
    normal = sorted(out.glob("obj00_normal_*.png"))
    assert len(rgb) == len(normal) == NUM_VIEWS and (out / "obj00_input.png").is_file()
    with Image.open(rgb[0]) as im:
        assert im.size == (SIZE, SIZE)
    with Image.open(out / "grid.png") as grid:
        # one validation object: RGB, normal, target RGB, target normal rows; input + N columns
        assert grid.size[0] > (NUM_VIEWS + 1) * SIZE and grid.size[1] > 4 * SIZE
        assert np.asarray(grid.convert("L")).std() > 5

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert any(k.startswith("unet.") for k in keys)
    assert not any(k.startswith(("vae.", "image_encoder.")) for k in keys)
    assert ckpt["hyper_parameters"]["unet_batch_size"] == 2 * 2 * NUM_VIEWS
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss_rgb_step", "train/loss_normal_step", "val/psnr_normal"):
        assert col in header, col


def test_generate_views_writes_views_normals_and_grid(mv_run, tmp_path: Path) -> None:
    run, _ = mv_run
    photo = tmp_path / "photo.png"
    rgba = np.zeros((90, 120, 4), dtype=np.uint8)
    rgba[20:70, 30:80] = (40, 160, 220, 255)  # an object on a transparent background
    Image.fromarray(rgba, "RGBA").save(photo)

    def generate(out: str, *extra: str) -> list[Path]:
        cfg = compose_config(
            "inference",
            [
                "task=generate_views",
                "model=mv_diffusion_tiny",
                f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"image={photo}",
                "task.num_inference_steps=2",
                "extras.print_config=false",
                *extra,
            ],
            tmp_path / out,
        )
        return inference(cfg)

    files = generate("a", "seed=1")
    names = sorted(p.name for p in files)
    assert names == sorted(
        ["photo_input.png", "grid.png"]
        + [f"photo_rgb_{v:02d}.png" for v in range(NUM_VIEWS)]
        + [f"photo_normal_{v:02d}.png" for v in range(NUM_VIEWS)]
    )
    assert files[-1].name == "grid.png" and files[-1].parent == tmp_path / "a" / "run" / "samples"
    with Image.open(files[0].parent / "photo_input.png") as im:
        pixels = np.asarray(im)
        assert im.size == (SIZE, SIZE)
        assert tuple(pixels[0, 0]) == (255, 255, 255)  # background composited on white
        assert tuple(pixels[SIZE // 2, SIZE // 2]) == (40, 160, 220)  # object recentred
    again = generate("b", "seed=1", "task.azimuths=[0,90,180,270]", "task.elevations=[0,0,0,0]")
    first = files[0].parent / "photo_rgb_01.png"
    second = again[0].parent / "photo_rgb_01.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    with pytest.raises(ValueError, match="camera layout has 2 views"):
        generate("c", "task.azimuths=[0,90]", "task.elevations=[0,0]")

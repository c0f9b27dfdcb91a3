"""End-to-end runs of ``train`` for the voxel VAE-GAN: files written, numbers that could be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from genlab.cli import train
from tests.helpers import TINY_VOXEL, compose_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config("train", [*TINY_VOXEL, "callbacks.samples.every_n_epochs=1"], tmp)
    metrics = train(cfg)
    return Path(cfg.paths.output_dir), metrics


def test_run_writes_metrics_checkpoints_and_samples(tiny_run: tuple[Path, dict]) -> None:
    run, metrics = tiny_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("val/iou", "test/iou", "test/cond_accuracy", "train/loss_g_epoch"):
        assert key in on_disk, key
    assert 0.0 <= on_disk["val/iou"] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_001", "epoch_002"]
    final = run / "samples" / "epoch_002"
    objs = sorted(final.glob("*.obj"))
    pngs = sorted(p for p in final.glob("*.png") if p.name != "grid.png")
    assert (final / "grid.png").is_file()
    assert len(pngs) == 5  # one per class prompt
    for obj in objs:
        mesh = trimesh.load(obj, process=False)
        assert len(mesh.faces) > 0
    assert (run / "conditioning.csv").read_text().splitlines()[0].startswith("prompt,box,cone")
    assert (run / "model.safetensors").is_file()
    with Image.open(run / "loss_curves.png") as im:
        assert im.size[0] >= 1000 and np.asarray(im.convert("L")).std() > 5


def test_checkpoint_holds_no_frozen_text_encoder_and_loads_weights_only(
    tiny_run: tuple[Path, dict],
) -> None:
    run, _ = tiny_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("generator.") for k in keys) and any(
        k.startswith("discriminator.") for k in keys
    )
    assert len(ckpt["optimizer_states"]) == 2
    assert "rng" in ckpt["callbacks"]["RNGStateCallback"]


def test_csv_log_has_separate_losses_and_system_stats(tiny_run: tuple[Path, dict]) -> None:
    run, _ = tiny_run
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in (
        "train/loss_recon_step",
        "train/loss_kl_step",
        "train/loss_adv_step",
        "train/loss_d_step",
        "val/iou",
    ):
        assert col in header, col
    assert any(c.startswith("lr-") for c in header)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


def test_resume_is_exact(tmp_path: Path) -> None:
    """2 epochs in one go == 1 epoch, then resume for the second: identical weights."""
    base = [
        *TINY_VOXEL,
        "test=false",
        "callbacks.samples.every_n_epochs=0",
        "model.generator.dropout_rate=0.1",
    ]
    straight = compose_config("train", [*base, "trainer.max_epochs=2"], tmp_path / "a")
    train(straight)
    first = compose_config("train", [*base, "trainer.max_epochs=1"], tmp_path / "b")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = compose_config(
        "train", [*base, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "c"
    )
    train(resumed)
    a, c = _weights(Path(straight.paths.output_dir)), _weights(Path(resumed.paths.output_dir))
    b = _weights(Path(first.paths.output_dir))
    assert a.keys() == c.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the second epoch did change the weights
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0, msg=k)


def test_ckpt_path_last_finds_newest_run(tmp_path: Path) -> None:
    from genlab.cli import resolve_ckpt_path

    logs = tmp_path / "logs"
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        resolve_ckpt_path("last", logs, "train")
    old = logs / "train" / "runs" / "old" / "checkpoints" / "last.ckpt"
    new = logs / "train" / "runs" / "new" / "checkpoints" / "last.ckpt"
    for i, p in enumerate((old, new)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        import os

        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    assert resolve_ckpt_path("last", logs, "train") == str(new)
    # the current run's own last.ckpt is never picked
    assert resolve_ckpt_path("last", logs, "train", current_run=new.parent.parent) == str(old)

"""The real entry points: ``python train.py -m`` as a subprocess, and ClearML tracking of a train() run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from genlab.cli import train
from tests.helpers import TINY_VOXEL, compose_config

REPO = Path(__file__).resolve().parents[2]
MICRO = [
    o for o in TINY_VOXEL if not o.startswith(("trainer.max_epochs", "data.dataset.num_per_class"))
] + [
    "trainer.max_epochs=1",
    "data.dataset.num_per_class=4",
    "callbacks.samples.every_n_epochs=0",
]


def test_multirun_gives_one_run_directory_per_job(tmp_path: Path) -> None:
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "GENLAB_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *MICRO,
        "model.optimizer.lr=1e-3,3e-4",
        "task_name=sweep",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "sweep" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert 0 <= metrics["val/iou"] <= 1
        assert (job / "checkpoints" / "last.ckpt").is_file() and (
            job / ".hydra" / "config.yaml"
        ).is_file()
        lrs.append(metrics["lr-Adam"])
    assert lrs == pytest.approx([1e-3, 3e-4])
    assert not (REPO / "logs" / "sweep").exists()  # everything went under PROJECT_ROOT


def test_train_with_clearml_writes_one_offline_session_with_train_val_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in (
        "CLEARML_API_HOST",
        "CLEARML_CONFIG_FILE",
        "CLEARML_OFFLINE_MODE",
        "CLEARML_TASK_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    (tmp_path / "home").mkdir()
    cfg = compose_config("train", [*MICRO, "logger=[csv,clearml]"], tmp_path)
    train(cfg)
    sessions = list((tmp_path / "clearml" / "offline").glob("*.zip"))
    assert len(sessions) == 1
    with zipfile.ZipFile(sessions[0]) as zf:
        task = json.loads(zf.read("task.json"))
        events = [
            e
            for line in zf.read("metrics.jsonl").decode().splitlines()
            if line.strip()
            for e in json.loads(line)
        ]
    scalars = {
        (e["metric"], e["variant"]) for e in events if e.get("type") == "training_stats_scalar"
    }
    for pair in [
        ("train", "loss_recon_step"),
        ("val", "iou"),
        ("test", "iou"),
        ("test", "cond_accuracy"),
    ]:
        assert pair in scalars, pair
    assert any(e.get("type") == "training_debug_image" for e in events)  # the sample grid
    assert task["name"].startswith("train")
    config_text = json.dumps(task.get("configuration", {}))
    assert "genlab.models.voxel_vaegan.VoxelVAEGAN" in config_text

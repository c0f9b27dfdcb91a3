"""`dvc repro pipelines/shape_e/dvc.yaml:encode` in a temporary DVC project: fills the latents,
keeping the latents already there, and a second repro does nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genlab.data.objaverse import read_latent
from genlab.data.synthetic_export import export_objaverse_layout
from genlab.models.shape_e.encode import build_encoder, encode_folder
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
STAGE = "pipelines/shape_e/dvc.yaml:encode"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def test_dvc_repro_encode_fills_missing_latents(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GENLAB_CONFIG_DIR", str(REPO_ROOT / "conf"))
    work = tmp_path / "project"
    for name in ("conf", "pipelines/shape_e", "src/genlab/models/shape_e"):
        shutil.copytree(REPO_ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    env.pop("GENLAB_CACHE_DIR", None)
    env.pop("GENLAB_CONFIG_DIR", None)  # the stage reads the project's own conf/
    _run(["dvc", "init", "--no-scm", "-q"], work, env)
    data = export_objaverse_layout(
        work / "data" / "synthetic_objaverse",
        classes=("sphere", "box"),
        num_per_class=1,
        voxel_size=16,
        num_views=1,
        image_size=16,
        num_points=256,
    )

    # one object already has a latent (written in-process by the same encoder): DVC keeps it
    # (persist) and the stage encodes only the other one
    latents = data / "latents"
    encoder = build_encoder("shape_e_encoder_tiny", [], None)
    kept = encode_folder(data, encoder, num_points=4096, only=["box_0000"])
    assert kept.encoded == ["box_0000"]
    before = (latents / "box_0000.pt").stat().st_mtime_ns

    first = _run(["dvc", "repro", STAGE], work, env)
    assert "2 objects: 1 encoded, 1 already had a latent (kept)" in first
    assert sorted(p.name for p in latents.iterdir()) == ["box_0000.pt", "sphere_0000.pt"]
    assert (latents / "box_0000.pt").stat().st_mtime_ns == before
    assert read_latent(latents / "sphere_0000.pt").shape == (64, 32)
    assert "didn't change" in _run(["dvc", "repro", STAGE], work, env)

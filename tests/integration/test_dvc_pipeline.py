"""`dvc repro` on a fresh copy of the repository runs prepare -> train -> evaluate offline; a
second `dvc repro` does nothing; `dvc push`/`dvc pull` round-trip through a local remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _fresh_copy(dest: Path) -> None:
    """The repository's tracked (and new, not ignored) files, as a fresh clone would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO_ROOT / name.decode()
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst = dest / name.decode()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("clone")
    work = root / "genlab"
    _fresh_copy(work)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_SITE_CACHE_DIR"] = str(root / "dvc-site")
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("GENLAB_CACHE_DIR", None)
    git = ["git", "-c", "user.name=genlab", "-c", "user.email=ci@genlab.invalid"]
    _run(["git", "init", "-q"], work, env)
    _run([*git, "add", "-A"], work, env)
    _run([*git, "commit", "-qm", "fresh clone"], work, env)
    # shorter training than the committed recipe; composed the way `dvc exp run -S` does it
    _run(["genlab-data", "params", "trainer.max_epochs=2"], work, env)
    return work, env


def test_repro_runs_the_whole_pipeline_then_does_nothing(repo) -> None:
    work, env = repo
    assert not (work / "data" / "raw").exists()
    first = _run(["dvc", "repro"], work, env)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first

    # the raw data came from the fallback generator and matches the version in data.dvc
    status = _run(["dvc", "status", "data.dvc"], work, env)
    assert "changed" not in status, status
    prepared = work / "data" / "prepared"
    report = json.loads((prepared / "report.json").read_text())
    assert report["problems"] == [] and report["counts"]["objects"] == 60
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert "voxels.npz" in manifest["files"]
    splits = json.loads((prepared / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["test"]) == 60 and len(splits["test"]) == 10

    metrics = json.loads((work / "outputs" / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/iou"] <= 1.0
    assert (work / "outputs" / "evaluate" / "samples.png").stat().st_size > 0
    shown = _run(["dvc", "metrics", "show", "--json"], work, env)
    assert "test/iou" in shown

    second = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in second, second
    assert "Data and pipelines are up to date" in second


def test_push_and_pull_through_the_local_remote(repo) -> None:
    work, env = repo
    raw = work / "data" / "raw"
    if not raw.exists():
        pytest.skip("needs the pipeline test's raw data")
    remote = work.parent / "remote"
    _run(["dvc", "remote", "add", "--local", "-f", "local", str(remote)], work, env)
    _run(["dvc", "commit", "-f", "data.dvc"], work, env)
    _run(["dvc", "push"], work, env)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    shutil.rmtree(raw)
    shutil.rmtree(work / ".dvc" / "cache")
    _run(["dvc", "pull", "data.dvc"], work, env)
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before

"""DataManager.ensure: present → dvc pull → local copy → fallback → DataUnavailableError."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from dvc.repo import Repo

from genlab.data.data_manager import DataManager, DataUnavailableError

# DVC 3.67 internals trip a pygtrie deprecation; nothing genlab can change
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

FILES = {"chair/a.off": b"OFF\n0 0 0\n", "table/b.off": b"OFF\n1 0 0\n"}


def write_set(folder: Path, files: dict[str, bytes] = FILES) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def contents(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def init_repo(root: Path, git: bool = False) -> None:
    """``dvc init --no-scm`` (or ``git init`` + ``dvc init``) with a local folder as default remote."""
    root.mkdir()
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    Repo.init(str(root), no_scm=not git).close()
    with Repo(str(root)) as r, r.config.edit() as conf:
        conf["remote"]["store"] = {"url": str(root.parent / "remote")}
        conf["core"]["remote"] = "store"


@pytest.fixture(autouse=True)
def dvc_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site_cache"))  # not /var/tmp/dvc


@pytest.fixture
def repo(tmp_path) -> Path:
    init_repo(tmp_path / "repo")
    return tmp_path / "repo"


@pytest.mark.parametrize("git", [False, True], ids=["no_scm", "git"])
def test_track_push_delete_then_ensure_pulls_it_back(tmp_path, git):
    repo = tmp_path / "repo"
    init_repo(repo, git=git)
    manager = DataManager(repo / "data", repo, tmp_path / "cache")
    target = repo / "data" / "shapes"
    write_set(target)

    manager.track(target)
    assert (repo / "data" / "shapes.dvc").is_file()
    assert (repo / "data" / ".gitignore").is_file() == git  # DVC keeps the data out of git
    with Repo(str(repo)) as r:
        assert r.push() == 3  # two files and the folder listing
    shutil.rmtree(target)
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote has the data now

    def must_not_run(path: Path) -> None:
        raise AssertionError("fallback used although dvc pull works")

    out = manager.ensure(
        "shapes", Path("shapes"), dvc_target="data/shapes.dvc", fallback=must_not_run
    )

    assert out == target
    assert contents(target) == FILES
    # present now: returns without DVC even when the target could not be pulled
    assert manager.ensure("shapes", target, dvc_target="data/nothing.dvc") == target


def test_empty_remote_falls_back_to_local_copy_then_to_fallback(tmp_path, repo):
    manager = DataManager(repo / "data", repo, tmp_path / "cache")
    target = repo / "data" / "shapes"
    write_set(target)
    manager.track(target)  # tracked but never pushed: the remote is empty
    shutil.rmtree(target)
    shutil.rmtree(repo / ".dvc" / "cache")
    copy = tmp_path / "elsewhere" / "shapes"
    write_set(copy, {"copied/c.off": b"OFF copy\n"})

    out = manager.ensure("shapes", target, dvc_target="data/shapes.dvc", local_copy=copy)
    assert contents(out) == {"copied/c.off": b"OFF copy\n"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["shapes", "shapes.dvc"]

    shutil.rmtree(target)
    calls = []

    def generate(path: Path) -> None:
        calls.append(path)
        write_set(path, {"synthetic/s.npy": b"\x93NUMPY"})

    out = manager.ensure(
        "shapes",
        target,
        dvc_target="data/shapes.dvc",
        local_copy=tmp_path / "no_such_copy",
        fallback=generate,
    )
    assert calls == [target]
    assert contents(out) == {"synthetic/s.npy": b"\x93NUMPY"}


def test_nothing_works_error_names_every_attempt(tmp_path, repo):
    manager = DataManager(repo / "data", repo, tmp_path / "cache")
    target = repo / "data" / "shapes"
    write_set(target)
    manager.track(target)
    shutil.rmtree(target)
    shutil.rmtree(repo / ".dvc" / "cache")
    target.mkdir()  # an empty folder does not count as present

    def broken(path: Path) -> None:
        path.mkdir()
        (path / "half").write_bytes(b"")
        raise OSError("generator crashed")

    with pytest.raises(DataUnavailableError) as err:
        manager.ensure(
            "shapes",
            target,
            dvc_target="data/shapes.dvc",
            local_copy=tmp_path / "no_such_copy",
            fallback=broken,
        )

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"shapes: cannot make {target} available; tried: dvc pull data/shapes.dvc (CheckoutError: "
    )
    assert f"; local copy {tmp_path / 'no_such_copy'} (FileNotFoundError: " in message
    assert message.endswith("; fallback broken (OSError: generator crashed)")
    assert [what for what, _ in err.value.attempts] == [
        "dvc pull data/shapes.dvc",
        f"local copy {tmp_path / 'no_such_copy'}",
        "fallback broken",
    ]
    assert not target.exists()  # the fallback's half-written folder was removed


def test_without_dvc_and_without_sources(tmp_path):
    plain = tmp_path / "plain"  # neither git nor DVC
    manager = DataManager(plain / "data", plain, tmp_path / "cache")
    target = plain / "data" / "shapes"

    with pytest.raises(DataUnavailableError) as err:
        manager.ensure("shapes", target)
    assert str(err.value) == (
        f"shapes: cannot make {target} available; "
        "tried: nothing (no dvc_target, local_copy or fallback given)"
    )

    with pytest.raises(DataUnavailableError) as err:
        manager.ensure("shapes", target, dvc_target="data/shapes.dvc")
    assert str(err.value) == (
        f"shapes: cannot make {target} available; tried: dvc pull data/shapes.dvc "
        f"(DataManagerError: {plain.resolve()} is not a DVC repository (no .dvc folder); "
        "run `dvc init` (or `dvc init --no-scm` outside git) there first)"
    )


def test_fetch_fallback_extracts_a_known_data_set_into_the_target(tmp_path):
    archive = tmp_path / "ModelNet10.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in FILES.items():
            zf.writestr(f"ModelNet10/{rel}", data)
    manager = DataManager(tmp_path / "data", tmp_path, tmp_path / "cache")

    out = manager.ensure(
        "mn10", Path("mn10"), fallback=manager.fetch_fallback("modelnet10", archive=archive)
    )

    assert out == tmp_path / "data" / "mn10"
    assert {k: v for k, v in contents(out).items() if not k.startswith(".")} == FILES
    assert (out / ".genlab_source.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["mn10"]
    assert (tmp_path / "cache" / "downloads" / "modelnet10" / "ModelNet10.zip").is_file()

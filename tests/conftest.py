"""Shared pytest fixtures for genlab."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TESTDATA = REPO_ROOT / ".." / "shared" / "testdata"


@pytest.fixture(scope="session")
def shared_testdata() -> Path:
    """Path to ``<repo>/../shared/testdata``; skips the test when the folder is absent."""
    if not SHARED_TESTDATA.is_dir():
        pytest.skip(f"../shared/testdata not present: {SHARED_TESTDATA.resolve()} does not exist")
    return SHARED_TESTDATA.resolve()


def shared_path(shared_testdata: Path, *parts: str) -> Path:
    """``shared_testdata/<parts...>``, or skip the test naming what is missing."""
    path = shared_testdata.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{'/'.join(parts)} not present in ../shared/testdata: {path} does not exist")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core machine two busy OpenMP
    threads can slow tiny models tenfold. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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

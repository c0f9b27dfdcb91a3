"""Parity tests against real pytorch3d: collect the largest differences and print them."""

from __future__ import annotations

import pytest

_MAX_DIFFS: dict[str, float] = {}


@pytest.fixture
def record_diff():
    """``record_diff(name, a, b)``: the max |a - b| of two tensors, kept for the summary."""

    def record(name: str, ours, theirs) -> float:
        diff = float((ours.detach().double() - theirs.detach().double()).abs().max())
        _MAX_DIFFS[name] = max(_MAX_DIFFS.get(name, 0.0), diff)
        return diff

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _MAX_DIFFS:
        return
    terminalreporter.section("genlab vs pytorch3d: max abs difference")
    for name, diff in sorted(_MAX_DIFFS.items()):
        terminalreporter.write_line(f"{name:<44} {diff:.3e}")

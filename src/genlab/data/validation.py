"""Data set validation shared by every datamodule: counts, split sizes and every bad file with its reason.

A datamodule's ``validate()`` fills a :class:`ValidationReport` by checking each file with the
readers of :mod:`genlab.data` (:func:`check_files` turns each :class:`DataFileError` into a
:class:`Problem`). ``genlab-data validate data=...`` prints the report; ``train.py`` runs the
same check before training, writes ``data_report.json`` into the run directory and, with
``data.on_bad_file=skip``, the list of skipped files (``skipped_files.csv``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

from genlab.atomic import write_text_atomic
from genlab.data.errors import DataFileError

__all__ = [
    "BAD_FILE_POLICIES",
    "DataValidationError",
    "Problem",
    "ValidationReport",
    "check_bad_file_policy",
    "check_files",
    "find_duplicates",
    "write_skip_list",
]

BadFilePolicy = Literal["error", "skip"]
BAD_FILE_POLICIES: tuple[str, ...] = ("error", "skip")
_LISTED = 20

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """The data set has bad files and ``on_bad_file=error``; the message lists them."""


def check_bad_file_policy(value: str) -> BadFilePolicy:
    """Return ``value`` if it is a known ``on_bad_file`` policy, else raise naming the choices."""
    if value not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {list(BAD_FILE_POLICIES)}, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Problem:
    """One bad file (or object) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ValidationReport:
    """What a data set holds and what is wrong with it."""

    dataset: str
    counts: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, name: str, n: int) -> None:
        """Record how many ``name`` (files, objects, images...) the data set has."""
        self.counts[name] = int(n)

    def split(self, name: str, n: int) -> None:
        """Record the size of split ``name``."""
        self.splits[name] = int(n)

    def add(self, path: str | os.PathLike[str], reason: str) -> None:
        self.problems.append(Problem(str(path), reason))

    def add_error(self, err: DataFileError) -> None:
        """Record a reader's error (its file, line and problem)."""
        where = err.path if err.line is None else f"{err.path}:{err.line}"
        self.problems.append(Problem(where, err.problem))

    def merge(self, other: ValidationReport) -> None:
        """Add another report's counts, splits and problems to this one."""
        for key, value in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + value
        for key, value in other.splits.items():
            self.splits[key] = self.splits.get(key, 0) + value
        self.problems.extend(other.problems)

    def summary(self, limit: int = _LISTED) -> str:
        """Human-readable report: counts, splits, then up to ``limit`` problems."""
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items()) or "nothing counted"
        lines = [f"data set {self.dataset}: {counts}"]
        if self.splits:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems[:limit]]
            if len(self.problems) > limit:
                lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_if_bad(self, hint: str = "set data.on_bad_file=skip to leave them out") -> None:
        """Raise :class:`DataValidationError` listing the problems, if there are any."""
        if not self.ok:
            raise DataValidationError(f"{self.summary()}\n({hint})")

    def enforce(self, on_bad_file: str, num_skipped: int, what: str = "object") -> None:
        """Apply the ``data.on_bad_file`` policy: raise listing every problem (``error``), or
        warn how many ``what``s the problems leave out (``skip``)."""
        if self.ok:
            return
        if on_bad_file == "error":
            self.raise_if_bad()
        log.warning(
            "%d problem(s); %d %s(s) skipped (data.on_bad_file=skip):\n%s",
            len(self.problems),
            num_skipped,
            what,
            self.summary(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "counts": dict(self.counts),
            "splits": dict(self.splits),
            "problems": [asdict(p) for p in self.problems],
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (atomically)."""
        return write_text_atomic(
            Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        )

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> ValidationReport:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        report = cls(data["dataset"], data.get("counts", {}), data.get("splits", {}))
        report.problems = [Problem(p["path"], p["reason"]) for p in data.get("problems", [])]
        return report


def check_files(
    paths: Iterable[_T],
    check: Callable[[_T], object],
    report: ValidationReport,
    desc: str = "checking files",
) -> list[_T]:
    """Run ``check`` on every path (with a progress bar); return the paths that passed.

    A :class:`DataFileError` is recorded in ``report``; any other exception propagates (it is
    a bug, not bad data).
    """
    items = list(paths)
    good: list[_T] = []
    for item in tqdm(items, desc=desc, unit="file", disable=len(items) < 2):
        try:
            check(item)
        except DataFileError as err:
            report.add_error(err)
        else:
            good.append(item)
    return good


def find_duplicates(ids: Iterable[str]) -> list[str]:
    """The ids that occur more than once, sorted."""
    return sorted(k for k, n in Counter(ids).items() if n > 1)


def write_skip_list(problems: Iterable[Problem], path: str | os.PathLike[str]) -> Path:
    """Write skipped files as CSV (``path,reason``), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for problem in problems:
        writer.writerow([problem.path, problem.reason])
    return write_text_atomic(Path(path), buffer.getvalue())

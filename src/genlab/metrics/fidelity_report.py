"""Subject-fidelity scores (DINO, CLIP-I, CLIP-T) as plain values and as files.

A scorer such as :class:`genlab.metrics.image_similarity.SubjectFidelity` returns
:class:`~genlab.metrics.image_similarity.SubjectFidelityScores`; any other scorer may return a
mapping of the same shape (scalar means, optionally ``per_prompt``). :func:`fidelity_values`
turns either into :class:`FidelityValues`, and the writers put them on disk:

- :func:`write_fidelity_csv`: one row per prompt (``prompt, num_images, dino, clip_i, clip_t``,
  plus ``baseline_<name>`` columns when a baseline is given), then a ``(mean)`` row over all
  images;
- :func:`write_fidelity_json`: the means, the per-prompt values and any extra fields.

Both write atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genlab.atomic import write_text_atomic

__all__ = [
    "MEAN_ROW",
    "SCORE_NAMES",
    "FidelityValues",
    "fidelity_values",
    "read_fidelity_csv",
    "write_fidelity_csv",
    "write_fidelity_json",
]

#: The DreamBooth scores, in the order they are written.
SCORE_NAMES = ("dino", "clip_i", "clip_t")
#: The ``prompt`` of the CSV row that holds the means over all images.
MEAN_ROW = "(mean)"
_COUNTS = ("num_images", "num_references")


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value)
    return None


@dataclass(frozen=True)
class FidelityValues:
    """Means (``{"dino": ..., "clip_i": ..., "clip_t": ...}``, or whatever scalars a scorer
    gives) and, per prompt in order of first appearance, the same names plus ``num_images``."""

    means: dict[str, float]
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_references: int = 0

    @property
    def names(self) -> list[str]:
        """Score names: the DreamBooth ones first, then any others of the scorer."""
        known = [n for n in SCORE_NAMES if n in self.means]
        return known + sorted(n for n in self.means if n not in SCORE_NAMES)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.means,
            "per_prompt": {p: dict(v) for p, v in self.per_prompt.items()},
            "num_images": self.num_images,
            "num_references": self.num_references,
        }


def fidelity_values(scores: Any) -> FidelityValues:
    """:class:`FidelityValues` from a scorer's result (an object with ``as_dict()`` or a mapping).

    Scalars (numbers, one-element tensors) become the means, except the image/reference
    counts; ``per_prompt`` entries that are not mappings are left out.
    """
    values = scores.as_dict() if hasattr(scores, "as_dict") else dict(scores)
    means: dict[str, float] = {}
    for key, value in values.items():
        number = _scalar(value)
        if number is not None and key not in _COUNTS:
            means[str(key)] = number
    per_prompt: dict[str, dict[str, float]] = {}
    for prompt, entry in (values.get("per_prompt") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        row = {str(k): _scalar(v) for k, v in entry.items()}
        row = {k: v for k, v in row.items() if v is not None}
        if "num_images" in row:
            row["num_images"] = int(row["num_images"])
        per_prompt[str(prompt)] = row
    return FidelityValues(
        means=means,
        per_prompt=per_prompt,
        num_images=int(_scalar(values.get("num_images")) or 0),
        num_references=int(_scalar(values.get("num_references")) or 0),
    )


def _format(value: float | None) -> str:
    if value is None:
        return ""
    return repr(float(value)) if math.isfinite(value) else str(value)


def write_fidelity_csv(
    path: str | Path, values: FidelityValues, baseline: FidelityValues | None = None
) -> Path:
    """One row per prompt and a final :data:`MEAN_ROW` row; ``baseline_<name>`` columns hold
    the baseline's values of the same prompt (empty where the baseline has no such prompt)."""
    names = values.names
    header = ["prompt", "num_images", *names]
    if baseline is not None:
        header += [f"baseline_{n}" for n in names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)

    def row(prompt: str, entry: Mapping[str, float], base: Mapping[str, float] | None, n: int):
        cells = [prompt, str(int(n)), *(_format(entry.get(name)) for name in names)]
        if baseline is not None:
            cells += [_format((base or {}).get(name)) for name in names]
        writer.writerow(cells)

    for prompt, entry in values.per_prompt.items():
        base = baseline.per_prompt.get(prompt) if baseline is not None else None
        row(prompt, entry, base, int(entry.get("num_images", 0)))
    row(MEAN_ROW, values.means, baseline.means if baseline else None, values.num_images)
    return write_text_atomic(Path(path), buffer.getvalue())


def read_fidelity_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """``{prompt: {column: value}}`` of a file written by :func:`write_fidelity_csv`
    (the means under :data:`MEAN_ROW`; empty cells left out)."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        r["prompt"]: {k: float(v) for k, v in r.items() if k != "prompt" and v not in ("", None)}
        for r in rows
    }


def write_fidelity_json(
    path: str | Path,
    values: FidelityValues,
    extra: Mapping[str, Any] | None = None,
    baseline: FidelityValues | None = None,
) -> Path:
    """``values.as_dict()`` (+ ``baseline``'s under ``"baseline"``) + ``extra`` as JSON."""
    payload: dict[str, Any] = {**values.as_dict()}
    if baseline is not None:
        payload["baseline"] = baseline.as_dict()
    payload |= dict(extra or {})
    text = json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n"
    return write_text_atomic(Path(path), text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value):
        return value.tolist()
    return value

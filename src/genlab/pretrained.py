"""Resolve pretrained weights (hub id, open_clip tag or local path) with one clear error offline."""

from __future__ import annotations

from pathlib import Path


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be found locally or downloaded."""


def local_path(spec: str | Path | None) -> Path | None:
    """Return ``spec`` as an existing local path, or None when it is not a local file/folder."""
    if spec is None:
        return None
    path = Path(str(spec)).expanduser()
    return path if path.exists() else None


def weights_unavailable(
    what: str, spec: str, config_key: str, cause: BaseException, offline_choice: str
) -> WeightsUnavailableError:
    """Build the one-line error shown when ``spec`` cannot be loaded (no network, no local copy)."""
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if len(reason) > 160:
        reason = reason[:160].rsplit(" ", 1)[0] + " ..."
    return WeightsUnavailableError(
        f"{what} weights '{spec}' are not available here ({reason}). Download them where there is "
        f"internet access and set {config_key}=/path/to/the/local/copy, or use {offline_choice}, "
        f"which needs no downloaded weights."
    )

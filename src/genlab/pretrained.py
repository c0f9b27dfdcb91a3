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
    what: str, spec: str, config_key: str, cause: BaseException
) -> WeightsUnavailableError:
    """Build the one-line error shown when ``spec`` cannot be loaded (no network, no local copy)."""
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return WeightsUnavailableError(
        f"{what} weights '{spec}' are not available here ({reason[:200]}): download them on a machine "
        f"with internet access and set {config_key}=/path/to/the/local/copy, or use the offline "
        f"variant built from config with random weights."
    )

"""Resolve pretrained weights (hub id, open_clip tag or local path) with one clear error offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def from_pretrained_or_explain(
    cls: Any,
    spec: str | Path,
    config_key: str,
    offline_choice: str,
    what: str | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(spec, **kwargs)`` with the one-line error when the weights are absent.

    ``cls`` is any class with a Hugging Face style ``from_pretrained`` (diffusers models and
    schedulers, transformers models and processors). A ``spec`` that is an existing local
    folder or file is loaded with ``local_files_only=True`` (nothing is downloaded); anything
    else is a hub id, fetched through the hub cache. A failure to find or read the files
    (``OSError``, which covers network and missing-file errors, or ``ValueError``) becomes a
    :class:`WeightsUnavailableError` naming ``spec``, ``config_key`` and ``offline_choice``
    (see :func:`weights_unavailable`); ``what`` names the part in the message (default: the
    class name).
    """
    local = local_path(spec)
    if local is not None:
        kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(str(local or spec), **kwargs)
    except (OSError, ValueError) as err:
        raise weights_unavailable(
            what or getattr(cls, "__name__", str(cls)), str(spec), config_key, err, offline_choice
        ) from err

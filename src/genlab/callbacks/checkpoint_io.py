"""Checkpoint writing that never leaves a half-written file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the target folder, fsync, then rename over the target."""

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike,
        storage_options: Any | None = None,
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def replace_folder(staged: Path, target: Path) -> None:
    """Put the complete folder ``staged`` at ``target``, replacing what was there.

    A folder cannot be renamed over a non-empty one, so an existing ``target`` is first renamed
    aside (``.<name>.old``) and removed only once ``staged`` holds its place: a crash leaves
    either the old folder or the new one whole, never a mixture (in the instant between the two
    renames, the old one is at ``.<name>.old``).
    """
    old = target.with_name(f".{target.name}.old")
    remove_path(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    remove_path(old)


def remove_path(path: Path) -> None:
    """Remove the file or folder ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def staging_folder(target: Path) -> Path:
    """Where a checkpoint folder for ``target`` is written before :func:`replace_folder`."""
    return target.with_name(f".{target.name}.partial")

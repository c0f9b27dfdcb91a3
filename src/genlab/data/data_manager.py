"""Make a data folder present: already there, ``dvc pull``, a local copy, or a fallback.

``DataManager.ensure`` tries each source in turn and raises ``DataUnavailableError`` naming every
attempt and why it failed. DVC is used through its Python API and works in git repositories and in
``dvc init --no-scm`` ones alike.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genlab.data.fetch import fetch

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DataManagerError(RuntimeError):
    """A DVC operation on the data folder failed; the message names the target and the cause."""


class DataUnavailableError(DataManagerError):
    """None of the sources could provide the data: ``"<name>: cannot make <target> available; ..."``."""

    def __init__(self, name: str, target: Path, attempts: list[tuple[str, str]]):
        self.name, self.target, self.attempts = name, target, attempts
        tried = (
            "; ".join(f"{what} ({why})" for what, why in attempts)
            or "nothing (no dvc_target, local_copy or fallback given)"
        )
        super().__init__(f"{name}: cannot make {target} available; tried: {tried}")


def is_present(path: Path) -> bool:
    """A non-empty file or a folder with at least one entry."""
    if path.is_dir():
        return any(path.iterdir())
    return path.is_file() and path.stat().st_size > 0


def one_line(err: BaseException) -> str:
    """``"<Type>: <message>"`` on one line, without DVC's colour codes."""
    text = " ".join(_ANSI.sub("", str(err)).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class DataManager:
    """Provides data folders under ``data_dir`` from DVC, local copies or fallbacks.

    ``repo_root`` is the DVC repository (holding ``.dvc/``); ``cache_dir`` holds downloads made by
    :meth:`fetch_fallback`.
    """

    def __init__(self, data_dir: Path, repo_root: Path, cache_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.repo_root = Path(repo_root).resolve()
        self.cache_dir = Path(cache_dir)

    @property
    def has_dvc(self) -> bool:
        """Whether ``repo_root`` is an initialised DVC repository."""
        return (self.repo_root / ".dvc").is_dir()

    def ensure(
        self,
        name: str,
        target: Path,
        *,
        dvc_target: str | None = None,
        fallback: Callable[[Path], None] | None = None,
        local_copy: Path | None = None,
    ) -> Path:
        """Make ``target`` (relative: under ``data_dir``) present and return it.

        Tries, in order: already present; ``dvc pull <dvc_target>`` (relative to ``repo_root``);
        a copy of ``local_copy``; ``fallback(target)``.
        """
        target = self.data_dir / target if not Path(target).is_absolute() else Path(target)
        if is_present(target):
            log.info("%s: present at %s", name, target)
            return target
        attempts: list[tuple[str, str]] = []
        steps: list[tuple[str, Callable[[], None]]] = []
        if dvc_target is not None:
            steps.append((f"dvc pull {dvc_target}", lambda: self._pull(dvc_target)))
        if local_copy is not None:
            steps.append((f"local copy {local_copy}", lambda: _copy_into(Path(local_copy), target)))
        if fallback is not None:
            label = getattr(fallback, "__name__", type(fallback).__name__)
            steps.append((f"fallback {label}", lambda: fallback(target)))

        for what, step in steps:
            _remove(target)  # absent or empty: nothing of value is lost
            try:
                step()
            except Exception as err:
                attempts.append((what, one_line(err)))
                log.warning("%s: %s failed: %s", name, what, one_line(err))
                continue
            if is_present(target):
                log.info("%s: %s provided %s", name, what, target)
                return target
            attempts.append((what, f"finished but {target} is still missing or empty"))
            log.warning("%s: %s finished but %s is still missing or empty", name, what, target)
        _remove(target)
        raise DataUnavailableError(name, target, attempts)

    def track(self, target: Path) -> None:
        """``dvc add`` the folder (or file) ``target`` so it can be pushed to the DVC remote."""
        target = self.data_dir / target if not Path(target).is_absolute() else Path(target)
        if not is_present(target):
            raise DataManagerError(f"dvc add {target}: no such file or folder, or it is empty")
        with self._repo() as repo:
            try:
                repo.add(str(target))
            except Exception as err:
                raise DataManagerError(f"dvc add {target}: {one_line(err)}") from err
        log.info("tracked %s with DVC", target)

    def fetch_fallback(self, dataset: str, **kwargs: Any) -> Callable[[Path], None]:
        """A ``fallback`` that fetches the known data set ``dataset`` (``genlab.data.fetch``) into
        the target folder; ``kwargs`` go to :func:`~genlab.data.fetch.fetch` (``archive``, ``url``...)."""

        def fetch_known_dataset(target: Path) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.fetch-", dir=target.parent))
            try:
                os.replace(fetch(dataset, tmp, cache_dir=self.cache_dir, **kwargs), target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        fetch_known_dataset.__name__ = f"fetch {dataset}"
        return fetch_known_dataset

    # ---- DVC ----------------------------------------------------------------------------------
    def _repo(self):
        if not self.has_dvc:
            raise DataManagerError(
                f"{self.repo_root} is not a DVC repository (no .dvc folder); "
                "run `dvc init` (or `dvc init --no-scm` outside git) there first"
            )
        from dvc.repo import Repo  # heavy import: only when DVC is used

        return Repo(str(self.repo_root))

    def _pull(self, dvc_target: str) -> None:
        # DVC resolves relative targets against the working directory, not the repository
        path = Path(dvc_target)
        path = path if path.is_absolute() else self.repo_root / path
        with self._repo() as repo:
            repo.pull(targets=[str(path)])


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _copy_into(source: Path, target: Path) -> None:
    """Copy a folder (or file) to ``target`` through a hidden sibling, so no half copy is left."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.copy-", dir=target.parent))
    try:
        staged = tmp / target.name
        if source.is_dir():
            shutil.copytree(source, staged, symlinks=True)
        else:
            shutil.copy2(source, staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

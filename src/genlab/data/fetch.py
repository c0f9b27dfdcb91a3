"""Known data sets by name, downloaded (resumably, checksummed) and extracted into the data folder.

``fetch("modelnet40", Path("data"))`` downloads the archive into
``<cache_dir>/downloads/<name>/<file>`` (``.part`` while incomplete; a later call resumes it with
an HTTP ``Range`` request), checks its sha256, and extracts it atomically to ``data/modelnet40``.
A data set whose ``sha256`` is ``None`` gets its checksum recorded in ``<cache_dir>/checksums.json``
on first download, with a warning; later downloads of the same URL are checked against it.

Command line: ``genlab-data fetch modelnet40 [--archive FILE] [--url URL] ...``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ArchiveFormat = Literal["zip", "tar", "tar.gz"]
SOURCE_FILE = ".genlab_source.json"
CHECKSUMS_FILE = "checksums.json"
CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class FetchError(RuntimeError):
    """A data set could not be downloaded, verified or extracted; the message says which and why."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a known data set comes from.

    ``url=None``: no public download (the archive must be passed by hand).
    ``sha256=None``: checksum unknown; recorded on first download (with a warning) and checked after.
    ``extracts_to``: the folder inside the archive that becomes ``data_dir/<name>``.
    ``size_bytes``: approximate archive size, for the progress bar when the server sends none.
    """

    name: str
    url: str | None
    sha256: str | None
    archive_format: ArchiveFormat
    extracts_to: str | None
    size_bytes: int | None
    description: str
    homepage: str
    licence: str
    manual_download: str | None = None


KNOWN_DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in (
        DatasetSource(
            name="modelnet40",
            url="http://modelnet.cs.princeton.edu/ModelNet40.zip",
            sha256=None,
            archive_format="zip",
            extracts_to="ModelNet40",
            size_bytes=2_000_000_000,
            description="ModelNet40: 12,311 CAD meshes (.off) in 40 categories, train/test split",
            homepage="https://modelnet.cs.princeton.edu/",
            licence="academic research use only; see the homepage",
        ),
        DatasetSource(
            name="modelnet10",
            url="http://3dvision.princeton.edu/projects/2014/3DShapeNets/ModelNet10.zip",
            sha256=None,
            archive_format="zip",
            extracts_to="ModelNet10",
            size_bytes=470_000_000,
            description="ModelNet10: 4,899 CAD meshes (.off) in 10 categories, train/test split",
            homepage="https://modelnet.cs.princeton.edu/",
            licence="academic research use only; see the homepage",
        ),
        DatasetSource(
            name="shapenet_chairs",
            url=None,
            sha256=None,
            archive_format="zip",
            extracts_to="03001627",
            size_bytes=None,
            description="ShapeNetCore chairs (synset 03001627), about 6,800 meshes",
            homepage="https://shapenet.org/",
            licence="ShapeNet terms of use (non-commercial research, login required)",
            manual_download=(
                "shapenet_chairs has no public download (ShapeNet needs a login at "
                "https://shapenet.org/): download ShapeNetCore's 03001627 archive manually "
                "and pass it with --archive <file>"
            ),
        ),
    )
}


# ---- locations ---------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$GENLAB_CACHE_DIR``, else ``<repo>/.cache/genlab`` (the repo holding this source tree, or cwd)."""
    if env := os.environ.get("GENLAB_CACHE_DIR"):
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    root = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return root / ".cache" / "genlab"


def default_data_dir() -> Path:
    """``data/`` of the current folder."""
    return Path.cwd() / "data"


def download_path(cache_dir: Path, name: str, source: str) -> Path:
    """Where the archive of ``name`` fetched from ``source`` (URL or file) is kept in the cache."""
    file = PurePosixPath(unquote(urlparse(str(source)).path)).name or f"{name}.archive"
    return Path(cache_dir) / "downloads" / name / file


# ---- public API --------------------------------------------------------------------------------
def fetch(
    name: str,
    data_dir: Path,
    archive: str | Path | None = None,
    url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Make ``data_dir/<name>`` hold the extracted data set and return it.

    The archive comes from ``archive`` (a local file or ``file://`` URL), else ``url``, else the
    registry entry of ``name``. ``sha256`` overrides the registry checksum. Already extracted →
    returned as is unless ``force``.
    """
    if not _NAME_RE.match(name):
        raise FetchError(f"invalid data set name {name!r}: use letters, digits, '_', '-' or '.'")
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = data_dir / name
    if target.is_dir() and any(target.iterdir()) and not force:
        log.info("%s already present at %s", name, target)
        return target

    known = KNOWN_DATASETS.get(name)
    source = _resolve_source(name, known, archive, url)
    expected = (sha256 or (known.sha256 if known else None) or "").lower() or None
    local = _local_path(source)

    cached = download_path(cache_dir, name, source)
    if local is not None:  # a local file may change under the same name: always copy it afresh
        _copy(name, local, cached)
        digest = _verify(name, cached, source, expected, None)
    elif cached.is_file() and (digest := _verify(name, cached, source, expected, cache_dir, True)):
        log.info("%s: using cached %s", name, cached)
    else:
        size_hint = known.size_bytes if known and source == known.url else None
        _download(name, source, cached, size_hint)
        digest = _verify(name, cached, source, expected, cache_dir)

    _extract(
        name,
        cached,
        target,
        extracts_to=known.extracts_to if known else None,
        record={
            "name": name,
            ("archive" if local is not None else "url"): str(
                local.resolve() if local is not None else source
            ),
            "sha256": digest,
            "sha256_verified": expected is not None,
            "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return target


def clear_cache(cache_dir: Path, name: str | None = None) -> int:
    """Delete the downloaded (and partly downloaded) archives of ``name``, or of all; bytes freed."""
    if name is not None and not _NAME_RE.match(name):
        raise FetchError(f"invalid data set name {name!r}: use letters, digits, '_', '-' or '.'")
    root = Path(cache_dir) / "downloads"
    folder = root / name if name is not None else root
    if not folder.exists():
        return 0
    freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder)
    log.info("freed %d bytes from %s", freed, folder)
    return freed


# ---- source resolution -------------------------------------------------------------------------
def _resolve_source(
    name: str, known: DatasetSource | None, archive: str | Path | None, url: str | None
) -> str:
    if archive is not None:
        return str(archive)
    if url is not None:
        return url
    if known is None:
        names = ", ".join(sorted(KNOWN_DATASETS))
        raise FetchError(
            f"unknown data set {name!r} (known: {names}); "
            "pass --url <url> or --archive <file> to fetch it under this name"
        )
    if known.url is None:
        raise FetchError(known.manual_download or f"{name} has no public download; use --archive")
    return known.url


def _local_path(source: str) -> Path | None:
    """The file behind a ``file://`` URL or a plain path; None for a remote URL."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:
        raise FetchError(f"cannot fetch {source}: unsupported URL scheme {parsed.scheme!r}")
    return Path(source)


# ---- transfer ----------------------------------------------------------------------------------
def _progress(name: str, total: int | None, initial: int = 0) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
    )


def _copy(name: str, source: Path, dest: Path) -> None:
    if not source.is_file():
        raise FetchError(f"{source}: no such archive file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with (
        source.open("rb") as src,
        part.open("wb") as out,
        _progress(name, source.stat().st_size) as bar,
    ):
        while chunk := src.read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
    os.replace(part, dest)


def _download(name: str, url: str, dest: Path, size_hint: int | None) -> None:
    """Stream ``url`` into ``dest.part`` (resuming it when present), then rename it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = _get(url, have)
        if have and response.status_code in (206, 416) and _range_start(response) != have:
            response.close()  # a range we did not ask for, or the part is stale: start over
            log.warning("%s: cannot resume %s; starting over", name, part)
            have, response = 0, _get(url, 0)
        with response:
            if response.status_code >= 400:
                raise FetchError(
                    _cannot(name, url, f"HTTP {response.status_code} {response.reason}")
                )
            if have and response.status_code != 206:
                log.info("%s: server sent the whole file, restarting the download", name)
                have = 0
            length = response.headers.get("Content-Length", "")
            expected = have + int(length) if length.isdigit() else None
            with (
                part.open("ab" if have else "wb") as out,
                _progress(name, expected or size_hint, have) as bar,
            ):
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as err:
        raise FetchError(_cannot(name, url, _reason(err))) from err
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise FetchError(
            f"{url}: download incomplete ({got} of {expected} bytes in {part}); run again to resume"
        )
    os.replace(part, dest)


def _get(url: str, start: int) -> requests.Response:
    headers = {"Accept-Encoding": "identity"}  # byte counts must match the file
    if start:
        headers["Range"] = f"bytes={start}-"
    return requests.get(
        url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    )


def _range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _cannot(name: str, url: str, reason: str) -> str:
    return f"cannot download {name} from {url}: {reason}; pass a local copy with --archive <file>"


def _reason(err: requests.RequestException) -> str:
    """A short cause: 'Connection refused', 'timed out', ... without urllib3's object reprs."""
    if isinstance(err, requests.Timeout):
        return "timed out"
    text = str(err)
    if match := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text):
        return match.group(1).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- checksums ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(
    name: str,
    path: Path,
    source: str,
    expected: str | None,
    cache_dir: Path | None,
    quiet: bool = False,
) -> str | None:
    """The sha256 of ``path`` once checked against ``expected``, else against the checksum recorded
    under ``cache_dir`` (recorded now, with a warning, when there is none; ``cache_dir=None``: skip).

    A mismatch deletes the file and raises, or returns None when ``quiet``.
    """
    actual = _sha256(path)
    want, origin = expected, "expected"
    if want is None and cache_dir is not None:
        record_file = Path(cache_dir) / CHECKSUMS_FILE
        records = _load_json(record_file)
        want, origin = records.get(name, {}).get(source), f"recorded in {record_file}"
        if want is None:
            records.setdefault(name, {})[source] = actual
            _save_json(record_file, records)
            log.warning(
                "%s: no known sha256 for %s; recorded %s in %s, later downloads must match it",
                name,
                source,
                actual,
                record_file,
            )
            return actual
    if want is None or actual == want:
        return actual
    path.unlink(missing_ok=True)
    if quiet:
        return None
    raise FetchError(
        f"{source}: sha256 mismatch for {name}: {origin} {want}, got {actual}; deleted {path}"
    )


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---- extraction --------------------------------------------------------------------------------
def _unsafe(member: str) -> bool:
    """Absolute, drive-qualified or ``..``-containing member names would escape the folder."""
    posix, windows = PurePosixPath(member), PureWindowsPath(member)
    return (
        posix.is_absolute()
        or windows.is_absolute()
        or bool(windows.drive)
        or ".." in posix.parts
        or ".." in windows.parts
    )


def _check_members(archive: Path, names: Iterable[tuple[str, str | None]]) -> None:
    for member, link in names:
        if _unsafe(member) or (link is not None and _unsafe(link)):
            bad = member if _unsafe(member) else f"{member} -> {link}"
            raise FetchError(
                f"{archive}: member {bad!r} would be written outside the extraction folder "
                "(absolute path or '..'); refusing to extract"
            )


def _extract_all(name: str, archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            _check_members(archive, ((m.filename, None) for m in members))
            for member in tqdm(members, desc=f"extracting {name}", unit="file", leave=False):
                zf.extract(member, dest)
        return
    if not tarfile.is_tarfile(archive):
        raise FetchError(f"{archive}: not a zip, tar or tar.gz archive")
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        _check_members(
            archive, ((m.name, m.linkname if m.issym() or m.islnk() else None) for m in members)
        )
        for member in members:
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise FetchError(f"{archive}: member {member.name!r} is a device or fifo; refusing")
        for member in tqdm(members, desc=f"extracting {name}", unit="file", leave=False):
            if hasattr(tarfile, "data_filter"):
                tf.extract(member, dest, filter="data")
            else:  # pragma: no cover - Python without tar extraction filters
                tf.extract(member, dest)


def _extracted_root(tmp: Path, extracts_to: str | None) -> Path:
    """The folder inside the extraction that becomes the data set: ``extracts_to``, else the only
    top-level folder (ignoring ``__MACOSX`` and dot files), else everything."""
    if extracts_to and (tmp / extracts_to).is_dir():
        return tmp / extracts_to
    entries = [p for p in tmp.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return tmp


def _extract(name: str, archive: Path, target: Path, extracts_to: str | None, record: dict) -> None:
    """Extract into a hidden sibling of ``target``, then move it into place in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name}.tmp-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _extract_all(name, archive, tmp)
        root = _extracted_root(tmp, extracts_to)
        (root / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if root == tmp:  # mkdtemp makes it private; give it a data folder's mode
            root.chmod(0o755)
        if target.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.replace(target, old)
            os.replace(root, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s extracted to %s", name, target)


# ---- command line ------------------------------------------------------------------------------

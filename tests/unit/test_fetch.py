"""fetch(): download (resumable) from a local HTTP server, checksum, atomic extraction, cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genlab.data import fetch as fetch_mod
from genlab.data.fetch import FetchError, clear_cache, download_path, fetch

MESH = b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n"
FILES = {"chair/train/chair_0001.off": MESH, "chair/test/chair_0002.off": MESH + b"# 2\n"}


def make_zip(path: Path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def make_tar_gz(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Files served over HTTP on 127.0.0.1; records each request's Range header and bytes sent."""

    def __init__(self, honour_range: bool):
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.sent: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                data = outer.files.get(self.path)
                outer.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                rng = self.headers.get("Range")
                if honour_range and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.sent.append(len(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(honour_range=True)
    yield s
    s.close()


@pytest.fixture
def no_range_server() -> Iterator[Server]:
    s = Server(honour_range=False)
    yield s
    s.close()


@pytest.fixture
def modelnet_zip(tmp_path: Path) -> tuple[Path, bytes]:
    members = {f"ModelNet40/{k}": v for k, v in FILES.items()}
    members["__MACOSX/ModelNet40/._chair"] = b"junk"
    path = tmp_path / "src" / "ModelNet40.zip"
    path.parent.mkdir()
    return path, make_zip(path, members)


def assert_extracted(folder: Path) -> None:
    for rel, data in FILES.items():
        assert (folder / rel).read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == [".genlab_source.json", "chair"]


def test_download_checks_sha256_extracts_and_records_the_source(tmp_path, server, modelnet_zip):
    _, data = modelnet_zip
    server.files["/ModelNet40.zip"] = data
    url = f"{server.url}/ModelNet40.zip"
    data_dir, cache = tmp_path / "data", tmp_path / "cache"

    out = fetch("modelnet40", data_dir, url=url, sha256=sha(data), cache_dir=cache)

    assert out == data_dir / "modelnet40"
    assert_extracted(out)  # ModelNet40/ inside the archive became data/modelnet40, __MACOSX dropped
    source = json.loads((out / ".genlab_source.json").read_text())
    assert {k: source[k] for k in ("name", "url", "sha256", "sha256_verified")} == {
        "name": "modelnet40",
        "url": url,
        "sha256": sha(data),
        "sha256_verified": True,
    }
    assert source["fetched_at"][:2] == "20"
    cached = download_path(cache, "modelnet40", url)
    assert cached == cache / "downloads" / "modelnet40" / "ModelNet40.zip"
    assert cached.read_bytes() == data
    assert sorted(p.name for p in data_dir.iterdir()) == ["modelnet40"]  # no temp folders left
    assert server.ranges == [None]

    assert fetch("modelnet40", data_dir, url=url, cache_dir=cache) == out
    assert len(server.ranges) == 1  # already extracted: nothing requested


def test_unknown_checksum_is_recorded_then_enforced(tmp_path, server, caplog):
    archive = tmp_path / "toy.tar.gz"
    data = make_tar_gz(archive, {f"toy-1.0/{k}": v for k, v in FILES.items()})
    server.files["/toy.tar.gz"] = data
    url = f"{server.url}/toy.tar.gz"
    cache = tmp_path / "cache"

    with caplog.at_level(logging.WARNING, logger="genlab.data.fetch"):
        out = fetch("toy", tmp_path / "data", url=url, cache_dir=cache)
    assert_extracted(out)  # the single top-level folder became data/toy
    assert json.loads((cache / "checksums.json").read_text()) == {"toy": {url: sha(data)}}
    assert f"no known sha256 for {url}; recorded {sha(data)}" in caplog.text

    clear_cache(cache)
    server.files["/toy.tar.gz"] = changed = make_tar_gz(archive, {"toy-1.0/other.off": MESH})
    cached = download_path(cache, "toy", url)
    with pytest.raises(FetchError) as err:
        fetch("toy", tmp_path / "data", url=url, cache_dir=cache, force=True)
    assert str(err.value) == (
        f"{url}: sha256 mismatch for toy: recorded in {cache / 'checksums.json'} {sha(data)}, "
        f"got {sha(changed)}; deleted {cached}"
    )
    assert not cached.exists()
    assert_extracted(out)  # the earlier extraction is untouched


def test_partial_download_is_resumed_with_a_range_request(tmp_path, server, modelnet_zip):
    _, data = modelnet_zip
    server.files["/ModelNet40.zip"] = data
    url = f"{server.url}/ModelNet40.zip"
    cache = tmp_path / "cache"
    part = download_path(cache, "modelnet40", url).with_name("ModelNet40.zip.part")
    part.parent.mkdir(parents=True)
    half = len(data) // 2
    part.write_bytes(data[:half])

    out = fetch("modelnet40", tmp_path / "data", url=url, sha256=sha(data), cache_dir=cache)

    assert server.ranges == [f"bytes={half}-"]
    assert server.sent == [len(data) - half]  # only the missing tail was transferred
    assert download_path(cache, "modelnet40", url).read_bytes() == data
    assert not part.exists()
    assert_extracted(out)


def test_server_ignoring_range_restarts_cleanly(tmp_path, no_range_server, modelnet_zip):
    _, data = modelnet_zip
    no_range_server.files["/ModelNet40.zip"] = data
    url = f"{no_range_server.url}/ModelNet40.zip"
    cache = tmp_path / "cache"
    part = download_path(cache, "modelnet40", url).with_name("ModelNet40.zip.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])

    out = fetch("modelnet40", tmp_path / "data", url=url, sha256=sha(data), cache_dir=cache)

    assert no_range_server.ranges == [f"bytes={len(data) // 2}-"]
    assert no_range_server.sent == [len(data)]
    assert download_path(cache, "modelnet40", url).read_bytes() == data  # not half + whole
    assert_extracted(out)


def test_checksum_mismatch_raises_and_deletes_the_download(tmp_path, server, modelnet_zip):
    _, data = modelnet_zip
    server.files["/ModelNet40.zip"] = data
    url = f"{server.url}/ModelNet40.zip"
    cache, data_dir = tmp_path / "cache", tmp_path / "data"
    cached = download_path(cache, "modelnet40", url)

    with pytest.raises(FetchError) as err:
        fetch("modelnet40", data_dir, url=url, sha256="0" * 64, cache_dir=cache)

    assert str(err.value) == (
        f"{url}: sha256 mismatch for modelnet40: expected {'0' * 64}, got {sha(data)}; "
        f"deleted {cached}"
    )
    assert list(cached.parent.iterdir()) == []
    assert not (data_dir / "modelnet40").exists()


@pytest.mark.parametrize("how", ["path", "file_uri_archive", "file_uri_url"])
def test_local_archive_path_and_file_url(tmp_path, modelnet_zip, how):
    path, data = modelnet_zip
    cache = tmp_path / "cache"
    kwargs = {
        "path": {"archive": path},
        "file_uri_archive": {"archive": path.as_uri()},
        "file_uri_url": {"url": path.as_uri()},
    }[how]

    out = fetch("modelnet40", tmp_path / "data", sha256=sha(data), cache_dir=cache, **kwargs)

    assert_extracted(out)
    source = json.loads((out / ".genlab_source.json").read_text())
    assert (source["archive"], source["sha256"]) == (str(path.resolve()), sha(data))
    assert (cache / "downloads" / "modelnet40" / "ModelNet40.zip").read_bytes() == data


@pytest.mark.parametrize(
    "member,kind", [("../evil.off", "zip"), ("/tmp/evil.off", "tar.gz"), ("a/../../e.off", "zip")]
)
def test_path_traversal_member_is_refused(tmp_path, member, kind):
    archive = tmp_path / f"bad.{kind}"
    members = {"ok/a.off": MESH, member: b"evil"}
    (make_zip if kind == "zip" else make_tar_gz)(archive, members)
    data_dir = tmp_path / "data"

    with pytest.raises(FetchError) as err:
        fetch("bad", data_dir, archive=archive, cache_dir=tmp_path / "cache")

    cached = tmp_path / "cache" / "downloads" / "bad" / archive.name
    assert str(err.value) == (
        f"{cached}: member {member!r} would be written outside the extraction folder "
        "(absolute path or '..'); refusing to extract"
    )
    assert list(data_dir.iterdir()) == []
    assert not (tmp_path / "evil.off").exists() and not (tmp_path.parent / "e.off").exists()


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("pkg/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(FetchError, match=r"member 'pkg/passwd -> /etc/passwd' would be written"):
        fetch("link", tmp_path / "data", archive=archive, cache_dir=tmp_path / "cache")


def test_interrupted_extraction_leaves_no_folder(tmp_path, modelnet_zip, monkeypatch):
    path, data = modelnet_zip
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    real_extract = zipfile.ZipFile.extract
    calls = []

    def extract_then_die(self, member, dest):
        calls.append(member)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_extract(self, member, dest)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch("modelnet40", data_dir, archive=path, cache_dir=cache)
    assert len(calls) == 2
    assert list(data_dir.iterdir()) == []  # neither data/modelnet40 nor a temporary folder

    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    out = fetch("modelnet40", data_dir, archive=path, cache_dir=cache)
    assert_extracted(out)

    # a forced re-extraction that dies keeps the complete earlier copy
    calls.clear()
    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch("modelnet40", data_dir, archive=path, cache_dir=cache, force=True)
    assert_extracted(out)
    assert sorted(p.name for p in data_dir.iterdir()) == ["modelnet40"]


def test_clear_cache_returns_the_bytes_freed(tmp_path, modelnet_zip):
    path, data = modelnet_zip
    cache = tmp_path / "cache"
    fetch("modelnet40", tmp_path / "data", archive=path, cache_dir=cache)
    part = cache / "downloads" / "modelnet10" / "ModelNet10.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1234)

    assert clear_cache(cache, "modelnet40") == len(data)
    assert not (cache / "downloads" / "modelnet40").exists()
    assert part.exists()
    assert clear_cache(cache) == 1234
    assert not (cache / "downloads").exists()
    assert clear_cache(cache) == 0
    assert_extracted(tmp_path / "data" / "modelnet40")  # extracted data is not cache


def test_shapenet_chairs_needs_a_manual_archive(tmp_path):
    with pytest.raises(FetchError) as err:
        fetch("shapenet_chairs", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        "shapenet_chairs has no public download (ShapeNet needs a login at https://shapenet.org/): "
        "download ShapeNetCore's 03001627 archive manually and pass it with --archive <file>"
    )
    archive = tmp_path / "03001627.zip"
    make_zip(archive, {f"03001627/{k}": v for k, v in FILES.items()})
    assert_extracted(
        fetch("shapenet_chairs", tmp_path / "data", archive=archive, cache_dir=tmp_path)
    )


def test_connection_refused_is_one_clear_line(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ModelNet40.zip"
    known = fetch_mod.KNOWN_DATASETS["modelnet40"]
    monkeypatch.setitem(fetch_mod.KNOWN_DATASETS, "modelnet40", dataclasses.replace(known, url=url))
    with pytest.raises(FetchError) as err:
        fetch("modelnet40", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        f"cannot download modelnet40 from {url}: Connection refused; "
        "pass a local copy with --archive <file>"
    )


def test_http_error_and_unknown_name(tmp_path, server):
    url = f"{server.url}/missing.zip"
    with pytest.raises(FetchError) as err:
        fetch("thing", tmp_path / "data", url=url, cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        f"cannot download thing from {url}: HTTP 404 Not Found; pass a local copy with --archive <file>"
    )
    with pytest.raises(FetchError) as err:
        fetch("thing", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        "unknown data set 'thing' (known: modelnet10, modelnet40, shapenet_chairs); "
        "pass --url <url> or --archive <file> to fetch it under this name"
    )

"""Caption files: keyed or line-per-file ``.txt``, ``object_id,caption`` CSV, ``metadata.jsonl``;
``metadata.json`` image-to-object links.

Every problem raises :class:`CaptionError`, whose message names the file, the 1-based line
when there is one, and the problem, e.g. ``"captions.csv:7: empty caption for 'chair_01'"``.
All files are read as UTF-8; a leading byte-order mark is tolerated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from genlab.data.errors import DataFileError

__all__ = [
    "CaptionError",
    "read_caption_records_csv",
    "read_caption_records_json",
    "read_captions_csv",
    "read_captions_txt",
    "read_metadata_json",
    "read_metadata_jsonl",
    "require_captions",
]

_CSV_COLUMNS = ("object_id", "caption")
_MAX_LISTED = 10

_V = TypeVar("_V")


class CaptionError(DataFileError):
    """Captions could not be read or are incomplete; the message names the file and line."""


def _read_text(path: str | os.PathLike[str]) -> str:
    """The file as text (UTF-8, optional BOM); undecodable bytes raise with their line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise CaptionError(path, "file not found") from None
    except OSError as err:
        raise CaptionError(path, f"cannot read file: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CaptionError(
            path,
            f"not valid UTF-8: {err.reason} at byte {err.start} "
            "(save the file as UTF-8, e.g. 'iconv -f WINDOWS-1254 -t UTF-8' for Turkish text)",
            line,
        ) from None


def _split_lines(text: str) -> list[str]:
    """Lines split at ``\\n`` only (``\\r`` removed).

    ``str.splitlines`` would also split at characters such as U+2028 that may appear
    inside captions.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def _content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based number, line) of lines that are neither blank nor ``#`` comments."""
    for number, line in enumerate(_split_lines(text), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, line


def _add_unique(
    path: str | os.PathLike[str],
    out: dict[str, _V],
    first_line: dict[str, int],
    key: str,
    value: _V,
    line: int,
    what: str,
) -> None:
    """Insert ``key`` into ``out``; a second occurrence raises naming both lines."""
    if key in out:
        raise CaptionError(
            path, f"duplicate {what} {key!r} (lines {first_line[key]} and {line})", line
        )
    out[key] = value
    first_line[key] = line


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# .txt
# --------------------------------------------------------------------------------------------


def read_captions_txt(
    path: str | os.PathLike[str], file_names: list[str] | None = None
) -> dict[str, str]:
    """Read a caption ``.txt`` file into ``{file_name: caption}``.

    Two forms, decided per file: when every line has a TAB, the lines are
    ``file_name<TAB>caption`` (the keyed form wins, even when ``file_names`` is given;
    ``file_names`` is then not used and missing captions are left to
    :func:`require_captions`). Otherwise each line is one caption, matched in order to
    ``sorted(file_names)``, and the line count must equal the number of files. Blank lines
    and lines starting with ``#`` are skipped (so a caption cannot start with ``#``);
    captions are stripped. Raises :class:`CaptionError` for duplicate keys (naming both
    lines), empty keys or captions and count mismatches.
    """
    lines = list(_content_lines(_read_text(path)))
    if not lines:
        raise CaptionError(path, "no captions (the file is empty or only has comments)")
    if all("\t" in text for _, text in lines):
        return _keyed_captions(path, lines)
    if file_names is None:
        number = next(n for n, text in lines if "\t" not in text)
        raise CaptionError(
            path,
            "expected 'file_name<TAB>caption' (no TAB on this line); "
            "captions one per line need the list of file names",
            number,
        )
    return _ordered_captions(path, lines, file_names)


def _keyed_captions(path: str | os.PathLike[str], lines: list[tuple[int, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, text in lines:
        key, caption = (part.strip() for part in text.split("\t", 1))
        if not key:
            raise CaptionError(path, "empty file name before the TAB", number)
        if not caption:
            raise CaptionError(path, f"empty caption for {key!r}", number)
        _add_unique(path, out, first_line, key, caption, number, "file name")
    return out


def _ordered_captions(
    path: str | os.PathLike[str], lines: list[tuple[int, str]], file_names: list[str]
) -> dict[str, str]:
    names = sorted(file_names)
    if len(set(names)) != len(names):
        duplicate = next(a for a, b in zip(names[:-1], names[1:], strict=True) if a == b)
        raise CaptionError(path, f"file name {duplicate!r} is listed twice")
    if len(lines) != len(names):
        raise CaptionError(
            path,
            f"{len(lines)} caption lines for {len(names)} files "
            "(one caption per line, in sorted file-name order, is expected)",
        )
    return {name: text.strip() for name, (_, text) in zip(names, lines, strict=True)}


# --------------------------------------------------------------------------------------------
# .csv
# --------------------------------------------------------------------------------------------


def read_captions_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an ``object_id,caption`` CSV (header required) into ``{object_id: caption}``.

    Standard CSV quoting, so captions may hold commas, quotes and newlines; extra columns
    are ignored; blank rows are skipped; ids and captions are stripped. Raises
    :class:`CaptionError` (with the line where the row starts) for a missing header,
    malformed rows, empty ids or captions and duplicate ids.
    """
    rows = _csv_rows(path, _read_text(path))
    header = next(rows, None)
    if header is None:
        raise CaptionError(path, "empty file (expected the header 'object_id,caption')")
    header_line, columns = header
    names = [c.strip().lower() for c in columns]
    if not all(c in names for c in _CSV_COLUMNS):
        raise CaptionError(
            path,
            f"expected the header 'object_id,caption', got {_clip(','.join(columns))!r}",
            header_line,
        )
    id_col, caption_col = (names.index(c) for c in _CSV_COLUMNS)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, row in rows:
        if len(row) <= max(id_col, caption_col):
            raise CaptionError(
                path, f"expected at least {len(names)} fields, got {len(row)}", number
            )
        object_id, caption = row[id_col].strip(), row[caption_col].strip()
        if not object_id:
            raise CaptionError(path, "empty object_id", number)
        if not caption:
            raise CaptionError(path, f"empty caption for {object_id!r}", number)
        _add_unique(path, out, first_line, object_id, caption, number, "object_id")
    return out


def _csv_rows(path: str | os.PathLike[str], text: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank CSV rows of ``text`` with the line number where each starts."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line_num = 0
    while True:
        start = line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise CaptionError(path, f"malformed CSV: {err}", start) from err
        line_num = reader.line_num
        if any(field.strip() for field in row):
            yield start, row


def read_caption_records_csv(
    path: str | os.PathLike[str],
    key_columns: tuple[str, ...] = ("object_id", "file_name", "file"),
    optional_columns: tuple[str, ...] = ("style",),
) -> dict[str, dict[str, str]]:
    """Read a captions CSV with optional extra columns into ``{key: {"caption": ..., ...}}``.

    The key is the first of ``key_columns`` the header has (``object_id``, else a file
    name); ``caption`` is required, ``optional_columns`` (``style``) are returned when the
    header has them, ``""`` for an empty cell. Text is kept exactly as written apart from
    surrounding whitespace (UTF-8, optional BOM). Raises :class:`CaptionError` like
    :func:`read_captions_csv`.
    """
    rows = _csv_rows(path, _read_text(path))
    header = next(rows, None)
    expected = f"'{key_columns[0]},caption'"
    if header is None:
        raise CaptionError(path, f"empty file (expected a header such as {expected})")
    header_line, columns = header
    names = [c.strip().lower() for c in columns]
    key = next((c for c in key_columns if c in names), None)
    if key is None or "caption" not in names:
        raise CaptionError(
            path,
            f"expected a header with 'caption' and one of {list(key_columns)}, "
            f"got {_clip(','.join(columns))!r}",
            header_line,
        )
    wanted = {"caption": names.index("caption")}
    wanted |= {c: names.index(c) for c in optional_columns if c in names}
    key_col = names.index(key)
    out: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for number, row in rows:
        if len(row) <= max(key_col, wanted["caption"]):
            raise CaptionError(
                path, f"expected at least {len(names)} fields, got {len(row)}", number
            )
        name = row[key_col].strip()
        if not name:
            raise CaptionError(path, f"empty {key}", number)
        record = {c: (row[i].strip() if i < len(row) else "") for c, i in wanted.items()}
        if not record["caption"]:
            raise CaptionError(path, f"empty caption for {name!r}", number)
        _add_unique(path, out, first_line, name, record, number, key)
    return out


def _read_json_object(path: str | os.PathLike[str]) -> _Pairs:
    """The top-level JSON object of ``path`` (duplicate keys kept, in order); a
    :class:`CaptionError` naming the file, line and column when it is not one."""
    try:
        data = json.loads(_read_text(path), object_pairs_hook=_pairs_keeping_duplicates)
    except json.JSONDecodeError as err:
        raise CaptionError(
            path, f"invalid JSON: {err.msg} (column {err.colno})", err.lineno
        ) from None
    if not isinstance(data, _Pairs):
        raise CaptionError(path, f"expected a JSON object, got {_json_type(data)}")
    return data


def read_caption_records_json(
    path: str | os.PathLike[str], optional_fields: tuple[str, ...] = ("style",)
) -> dict[str, dict[str, str]]:
    """Captions (and ``optional_fields``) from a JSON file: ``{object_id: {"caption": ...}}``.

    Accepted forms: ``{"objects": [{"object_id": ..., "caption": ..., "style": ...}, ...]}``,
    ``{"<object_id>": {"caption": ..., "style": ...}, ...}`` and ``{"<object_id>": "caption"}``.
    Missing optional fields come back as ``""``. Raises :class:`CaptionError` naming the file
    and the entry for invalid JSON, missing or non-string captions and duplicate ids.
    """
    data = _read_json_object(path)
    top = dict(data.pairs)
    if isinstance(top.get("objects"), list):
        entries = []
        for index, record in enumerate(top["objects"]):
            if not isinstance(record, _Pairs):
                raise CaptionError(
                    path, f"objects[{index}]: expected a JSON object, got {_json_type(record)}"
                )
            fields = dict(record.pairs)
            object_id = fields.get("object_id")
            if not isinstance(object_id, str) or not object_id.strip():
                raise CaptionError(path, f"objects[{index}]: missing or empty 'object_id'")
            entries.append((object_id.strip(), fields, f"objects[{index}]"))
    else:
        entries = []
        for object_id, value in data.pairs:
            fields = dict(value.pairs) if isinstance(value, _Pairs) else {"caption": value}
            entries.append((object_id.strip(), fields, f"entry {object_id!r}"))
    out: dict[str, dict[str, str]] = {}
    for object_id, fields, entry in entries:
        caption = fields.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise CaptionError(path, f"{entry}: missing, empty or non-string 'caption'")
        record = {"caption": caption.strip()}
        for name in optional_fields:
            value = fields.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise CaptionError(
                    path, f"{entry}: {name!r} must be a string, got {_json_type(value)}"
                )
            record[name] = value.strip()
        if object_id in out:
            raise CaptionError(path, f"{entry}: duplicate object id {object_id!r}")
        out[object_id] = record
    return out


# --------------------------------------------------------------------------------------------
# metadata.jsonl
# --------------------------------------------------------------------------------------------


def read_metadata_jsonl(path: str | os.PathLike[str]) -> dict[str, dict]:
    """Read a Hugging Face imagefolder ``metadata.jsonl`` into ``{file_name: record}``.

    Each non-blank line is a JSON object with a string ``file_name`` and any other columns
    (the caption usually under ``"text"``); records are returned whole, so the caller picks
    the caption column. Raises :class:`CaptionError` naming the line for invalid JSON,
    non-object lines, a missing or empty ``file_name`` and duplicate file names.
    """
    out: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(_split_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaptionError(
                path, f"invalid JSON: {err.msg} (column {err.colno})", number
            ) from None
        if not isinstance(record, dict):
            raise CaptionError(path, f"expected a JSON object, got {type(record).__name__}", number)
        name = record.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise CaptionError(path, "missing or empty 'file_name'", number)
        _add_unique(path, out, first_line, name, record, number, "file_name")
    return out


# --------------------------------------------------------------------------------------------
# metadata.json (image -> object links)
# --------------------------------------------------------------------------------------------


def read_metadata_json(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``metadata.json`` of image-to-object links into ``{file_name: object_id}``.

    Two forms: ``{"images": [{"file_name": "images/x/000.png", "object_id": "x", ...}, ...]}``
    (other keys of the records and other top-level keys are ignored) and the plain mapping
    ``{"images/x/000.png": "x", ...}``. File names are paths relative to the data root, as
    written. Raises :class:`CaptionError` naming the file and the entry (``images[3]`` or the
    file name) for invalid JSON, a missing or empty ``file_name``/``object_id``, non-string
    values and duplicate file names.
    """
    data = _read_json_object(path)
    top = dict(data.pairs)
    if isinstance(top.get("images"), list):
        return _links_from_records(path, top["images"])
    out: dict[str, str] = {}
    for name, object_id in data.pairs:
        entry = f"entry {name!r}"
        if not name.strip():
            raise CaptionError(path, f"{entry}: empty file name")
        if not isinstance(object_id, str):
            raise CaptionError(
                path, f"{entry}: object id must be a string, got {_json_type(object_id)}"
            )
        _add_link(path, out, name, object_id, entry)
    return out


def _links_from_records(path: str | os.PathLike[str], records: list) -> dict[str, str]:
    out: dict[str, str] = {}
    for index, record in enumerate(records):
        entry = f"images[{index}]"
        if not isinstance(record, _Pairs):
            raise CaptionError(path, f"{entry}: expected a JSON object, got {_json_type(record)}")
        fields = dict(record.pairs)
        for key in ("file_name", "object_id"):
            if key not in fields:
                raise CaptionError(path, f"{entry}: missing {key!r}")
            if not isinstance(fields[key], str):
                raise CaptionError(
                    path, f"{entry}: {key!r} must be a string, got {_json_type(fields[key])}"
                )
        if not fields["file_name"].strip():
            raise CaptionError(path, f"{entry}: empty 'file_name'")
        _add_link(path, out, fields["file_name"], fields["object_id"], entry)
    return out


def _add_link(
    path: str | os.PathLike[str], out: dict[str, str], name: str, object_id: str, entry: str
) -> None:
    if not object_id.strip():
        raise CaptionError(path, f"{entry}: empty object id")
    if name in out:
        where = "" if entry.startswith("entry ") else f"{entry}: "
        raise CaptionError(path, f"{where}duplicate file name {name!r}")
    out[name] = object_id


class _Pairs:
    """A JSON object as its (key, value) pairs in file order, duplicate keys kept."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def _pairs_keeping_duplicates(pairs: list[tuple[str, object]]) -> _Pairs:
    return _Pairs(pairs)


def _json_type(value: object) -> str:
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number" if isinstance(value, (int, float)) else "a string"


# --------------------------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------------------------


def require_captions(ids: Iterable[str], captions: Mapping[str, object], source: str) -> None:
    """Raise :class:`CaptionError` (for ``source``) unless every id has a caption.

    The message gives the number of ids without one and lists up to 10 of them.
    """
    ids = list(ids)
    missing = [i for i in ids if i not in captions]
    if not missing:
        return
    listed = ", ".join(repr(i) for i in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    raise CaptionError(source, f"{len(missing)} of {len(ids)} ids have no caption: {listed}{more}")

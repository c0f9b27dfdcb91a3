"""Caption readers: keyed/ordered .txt, object_id,caption CSV, metadata.jsonl, completeness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genlab.data.captions import (
    CaptionError,
    read_captions_csv,
    read_captions_txt,
    read_metadata_jsonl,
    require_captions,
)

TURKISH = "İstanbul'da ığdır çay bardağı"


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------- .txt


def test_keyed_txt(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "captions.txt",
        "# file<TAB>caption\n\nb.png\ta red chair \n a.png\tкресло\tс подушкой\n",
    )
    assert read_captions_txt(path) == {"b.png": "a red chair", "a.png": "кресло\tс подушкой"}


def test_keyed_form_wins_over_file_names(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "x.png\tone\ny.png\ttwo\n")
    assert read_captions_txt(path, ["a.png"]) == {"x.png": "one", "y.png": "two"}


def test_ordered_txt_matches_sorted_file_names(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "\ufeff# comment\nfirst caption\n\n" + TURKISH + "\r\n")
    assert read_captions_txt(path, ["02.jpg", "01.jpg"]) == {
        "01.jpg": "first caption",
        "02.jpg": TURKISH,
    }


def test_ordered_txt_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "one\ntwo\nthree\n")
    with pytest.raises(CaptionError, match="captions.txt: 3 caption lines for 2 files"):
        read_captions_txt(path, ["a.png", "b.png"])


def test_ordered_txt_needs_file_names(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "a.png\tkeyed\njust a caption\n")
    with pytest.raises(CaptionError, match=r"captions.txt:2: expected 'file_name<TAB>caption'"):
        read_captions_txt(path)


def test_keyed_txt_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "a.png\tone\n# note\nb.png\ttwo\na.png\tthree\n")
    with pytest.raises(
        CaptionError, match=r"captions.txt:4: duplicate file name 'a.png' \(lines 1 and 4\)"
    ):
        read_captions_txt(path)


def test_keyed_txt_empty_caption_and_key(tmp_path: Path) -> None:
    with pytest.raises(CaptionError, match=r":2: empty caption for 'b.png'"):
        read_captions_txt(write(tmp_path, "c.txt", "a.png\tone\nb.png\t \n"))
    with pytest.raises(CaptionError, match=r":1: empty file name"):
        read_captions_txt(write(tmp_path, "d.txt", "\tone\n"))


def test_txt_empty_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(CaptionError, match="no captions"):
        read_captions_txt(write(tmp_path, "empty.txt", "# only a comment\n\n"))
    with pytest.raises(CaptionError, match=r"latin1.txt:2: not valid UTF-8"):
        read_captions_txt(write(tmp_path, "latin1.txt", "a\tok\nb\tcafé\n", "latin-1"))
    with pytest.raises(CaptionError, match="missing.txt: file not found"):
        read_captions_txt(tmp_path / "missing.txt")


def test_txt_line_separator_inside_caption_is_not_a_line_break(tmp_path: Path) -> None:
    path = write(tmp_path, "captions.txt", "a.png\tfirst\u2028second\n")
    assert read_captions_txt(path) == {"a.png": "first\u2028second"}


# -------------------------------------------------------------------------------------- .csv


def test_csv_quoting_newlines_and_unicode_round_trip(tmp_path: Path) -> None:
    text = (
        "object_id,caption\n"
        'chair_1,"кресло, мягкое"\n'
        f"cup_2,{TURKISH}\n"
        "\n"
        'lamp_3,"a lamp\nwith ""two"" lines"\n'
    )
    path = write(tmp_path, "captions.csv", "\ufeff" + text)
    assert read_captions_csv(path) == {
        "chair_1": "кресло, мягкое",
        "cup_2": TURKISH,
        "lamp_3": 'a lamp\nwith "two" lines',
    }


def test_csv_header_required(tmp_path: Path) -> None:
    path = write(tmp_path, "cap3d.csv", "ed51a51,a wooden chair\n")
    with pytest.raises(CaptionError, match=r"cap3d.csv:1: expected the header 'object_id,caption'"):
        read_captions_csv(path)
    with pytest.raises(CaptionError, match="empty file"):
        read_captions_csv(write(tmp_path, "empty.csv", ""))


def test_csv_extra_columns_and_column_order(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "caption,source,object_id\na chair,cap3d,c1\n")
    assert read_captions_csv(path) == {"c1": "a chair"}


def test_csv_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", 'object_id,caption\na,"one\ntwo"\nb,x\na,again\n')
    with pytest.raises(CaptionError, match=r"c.csv:5: duplicate object_id 'a' \(lines 2 and 5\)"):
        read_captions_csv(path)


def test_csv_empty_caption_names_id_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "object_id,caption\na,fine\nb,  \n")
    with pytest.raises(CaptionError, match=r"c.csv:3: empty caption for 'b'"):
        read_captions_csv(path)
    path = write(tmp_path, "d.csv", "object_id,caption\na\n")
    with pytest.raises(CaptionError, match=r"d.csv:2: expected at least 2 fields, got 1"):
        read_captions_csv(path)


def test_csv_malformed_quoting(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", 'object_id,caption\na,"unterminated\n')
    with pytest.raises(CaptionError, match=r"c.csv:2: malformed CSV"):
        read_captions_csv(path)


# ---------------------------------------------------------------------------- metadata.jsonl


def test_metadata_jsonl(tmp_path: Path) -> None:
    records = [
        {"file_name": "0001.png", "text": "кресло"},
        {"file_name": "train/0002.png", "caption": TURKISH, "score": 0.5},
    ]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n"
    assert read_metadata_jsonl(write(tmp_path, "metadata.jsonl", text)) == {
        "0001.png": records[0],
        "train/0002.png": records[1],
    }


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            '{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": }\n',
            "2: invalid JSON",
        ),
        ('{"file_name": "a.png"}\n\n{"text": "no name"}\n', "3: missing or empty 'file_name'"),
        ('["a.png", "x"]\n', "1: expected a JSON object, got list"),
        (
            '{"file_name": "a.png"}\n{"file_name": "a.png"}\n',
            r"2: duplicate file_name 'a.png' \(lines 1 and 2\)",
        ),
    ],
)
def test_metadata_jsonl_errors_name_the_line(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(CaptionError, match=f"metadata.jsonl:{problem}"):
        read_metadata_jsonl(write(tmp_path, "metadata.jsonl", body))


# ------------------------------------------------------------------------------ completeness


def test_require_captions() -> None:
    require_captions(["a", "b"], {"a": "x", "b": "y", "c": "z"}, "captions.csv")
    ids = [f"id{i:02d}" for i in range(15)]
    with pytest.raises(CaptionError) as info:
        require_captions(ids, {"id00": "x"}, "captions.csv")
    message = str(info.value)
    assert message.startswith("captions.csv: 14 of 15 ids have no caption: 'id01'")
    assert "'id10'" in message and "'id11'" not in message and "and 4 more" in message

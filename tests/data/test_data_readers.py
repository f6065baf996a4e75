"""data.readers: the one reader of a whole UTF-8 text file and the JSON error mapping (issue 18: one place each)."""

from __future__ import annotations

import pytest

from slmkit.data.readers import json_line, read_utf8
from slmkit.errors import DataError


def test_read_utf8_names_the_file_the_line_and_the_emptiness(tmp_path):
    p = tmp_path / "t.txt"
    with pytest.raises(DataError, match=r"perplexity file .*t\.txt does not exist"):
        read_utf8(p, "perplexity file", "x")
    p.write_bytes(b"one\r\ntwo\n")
    assert read_utf8(p, "perplexity file", "x") == "one\ntwo\n"  # universal newlines, as Path.read_text
    p.write_bytes(b"ok\nok\nbad \xff here\n")
    with pytest.raises(DataError, match=r"t\.txt:3: not UTF-8 text"):
        read_utf8(p, "perplexity file", "x")
    p.write_text(" \n\n")
    with pytest.raises(DataError, match=r"calibration file .*t\.txt is empty") as e:
        read_utf8(p, "calibration file", "pass a file with some text")
    assert e.value.hint == "pass a file with some text"


def test_json_line_names_the_line_of_a_whole_file():
    with pytest.raises(DataError, match=r"^f\.json:3: not valid JSON"):
        json_line('{\n "a": 1,\n oops}', "f.json", whole_file=True)
    with pytest.raises(DataError, match=r"^f\.jsonl:7: not valid JSON"):
        json_line("{oops}", "f.jsonl:7")
    assert json_line('{"a": [1]}', "f.json", whole_file=True) == {"a": [1]}

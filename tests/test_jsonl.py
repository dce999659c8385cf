"""The one JSON-lines reader/writer: errors name file and line, torn last lines are handled."""
from __future__ import annotations

import pytest

from fastchat_cllm.jsonl import jsonl_writer, numbered_jsonl, read_jsonl, write_jsonl


def test_round_trip_skips_blank_lines_and_numbers_lines_from_one(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl([{"a": 1}, [2, 3], "é"], path)
    assert read_jsonl(path) == [{"a": 1}, [2, 3], "é"]
    path.write_text('{"a": 1}\n\n  \n{"b": 2}\n')
    assert list(numbered_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_malformed_or_missing_input_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(path, torn_end=True)          # not the last line: never torn
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_torn_last_line_is_skipped_when_asked_and_dropped_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo')
    with pytest.raises(ValueError, match=r"log\.jsonl:2"):
        read_jsonl(path)
    assert read_jsonl(path, torn_end=True) == [{"step": 0}]
    with jsonl_writer(path, append=True) as write:
        write({"step": 1})
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'

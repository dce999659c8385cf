"""JSON lines, read and written in one place: prompts, trajectories, loss logs, problem sets.

A file is one JSON value a line; blank lines are skipped. Writers flush every line, so an
interrupted run leaves at most one torn last line, which readers asked to (`torn_end=True`)
skip and an appending writer drops before it appends.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def numbered_jsonl(path: str | Path, torn_end: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number from 1, value) for each non-blank line; ValueError names the file and line
    of a missing file or malformed JSON (a torn last line is skipped when `torn_end`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_end and number == len(lines) and not text.endswith("\n"):
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        yield number, value


def read_jsonl(path: str | Path, torn_end: bool = False) -> list[Any]:
    """The values of a JSON-lines file (see numbered_jsonl)."""
    return [value for _, value in numbered_jsonl(path, torn_end)]


@contextmanager
def jsonl_writer(path: str | Path, append: bool = False) -> Iterator[Callable[[Any], None]]:
    """A function writing one value a line (flushed); appending first drops a torn last line."""
    path = Path(path)
    if append and path.exists():
        _drop_torn_end(path)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        def write(value: Any) -> None:
            f.write(json.dumps(value) + "\n")
            f.flush()
        yield write


def write_jsonl(values: Iterable[Any], path: str | Path) -> None:
    """Write `values` to `path`, one a line (the file is replaced)."""
    with jsonl_writer(path) as write:
        for value in values:
            write(value)


def _drop_torn_end(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")

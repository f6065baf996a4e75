"""Readers for the data formats slmkit accepts; errors name the file and line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from slmkit.errors import DataError


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_jsonl(path: str | Path, limit: int = 0) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a (possibly gzipped) jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    n = 0
    with _open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
            n += 1
            if limit and n >= limit:
                return


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), limit: int = 0) -> list[dict]:
    """Rows of a (possibly gzipped) jsonl file; each must be an object with ``required`` keys."""
    rows = []
    for lineno, row in iter_jsonl(path, limit):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def read_lines(path: str | Path) -> Iterator[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with _open(path) as fh:
        yield from (line.rstrip("\n") for line in fh)

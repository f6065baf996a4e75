"""Readers for the data formats slmkit accepts; errors name the file and line.

Every reader here turns a bad file into a :class:`~slmkit.errors.DataError` (exit 2, one or
two lines): text that is not UTF-8 (with the line and byte), a ``.gz`` that is not gzip or is
cut short, a line that is not JSON or is nested too deeply, a line longer than
:data:`MAX_LINE_BYTES`. Lines are read as bytes and decoded one by one, so the line number in
an encoding error is exact.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from slmkit.errors import DataError

MAX_LINE_BYTES = 256 << 20  #: a longer line is refused (a file that is not line-oriented, or is damaged)
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class Lines:
    """Decoded lines of a text file or a ``.gz`` of one (``with Lines(path) as fh: for line in fh``).

    Lines keep their ``"\\n"``; a ``"\\r\\n"`` ending reads as ``"\\n"`` and a UTF-8 byte order
    mark on the first line is dropped. ``lineno`` is the number of the last line returned.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lineno = 0
        self._fh = None

    def __enter__(self) -> Lines:
        try:
            self._fh = gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")
        except IsADirectoryError:
            raise DataError(f"{self.path} is a directory, not a file") from None
        except PermissionError:
            raise DataError(f"{self.path} cannot be read (permission denied)") from None
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def __iter__(self) -> Lines:
        return self

    def __next__(self) -> str:
        try:
            raw = self._fh.readline(MAX_LINE_BYTES + 1)
        except _GZIP_ERRORS as err:
            raise DataError(f"{self.path}: not a readable gzip file ({_why(err)}) after line {self.lineno}",
                            "pass the file uncompressed, or re-create the .gz") from None
        if not raw:
            raise StopIteration
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{self.path}:{self.lineno + 1}: line longer than {MAX_LINE_BYTES >> 20} MB")
        self.lineno += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{self.path}:{self.lineno}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line)",
                            "save the file as UTF-8") from None
        if self.lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        return line[:-2] + "\n" if line.endswith("\r\n") else line


def _why(err: BaseException) -> str:
    return "cut short" if isinstance(err, EOFError) else str(err) or type(err).__name__


def open_lines(path: Path) -> Lines:
    """Lines of a (possibly gzipped) UTF-8 text file; see :class:`Lines`."""
    return Lines(path)


def json_line(line: str | bytes, where: str, whole_file: bool = False):
    """One JSON value of a jsonl file; ``where`` (``file:line``) names it in the DataError.

    ``whole_file``: ``line`` is the text of a whole JSON file named ``where``; a syntax error names its line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}{f':{err.lineno}' if whole_file else ''}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # e.g. an integer of more than 4,300 digits
        raise DataError(f"{where}: not valid JSON ({str(err).splitlines()[0][:120]})") from None


def read_text(path: str | Path, what: str = "data file") -> str:
    """A whole UTF-8 text file (or ``.gz``); the DataError names the line of an encoding error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    with Lines(path) as fh:
        return "".join(fh)


def read_utf8(path: str | Path, what: str, empty_hint: str) -> str:
    """A whole UTF-8 file that must exist and hold some text, as is (no ``.gz``, no line-length limit).

    Each DataError names the file as ``what`` ("perplexity file", ...); a decoding error names its line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None
    if not text.strip():
        raise DataError(f"{what} {path} is empty", empty_hint)
    return text


def iter_jsonl(path: str | Path, limit: int = 0) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a (possibly gzipped) jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    n = 0
    with Lines(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            lineno = fh.lineno
            row = json_line(line, f"{path}:{lineno}")
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
    with Lines(path) as fh:
        yield from (line.rstrip("\n") for line in fh)

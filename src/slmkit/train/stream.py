"""Streaming language-modelling data: corpus files read lazily, tokenised on the fly, packed into blocks.

Packing follows GPT-2 / nanoGPT (Radford et al. 2019; nanoGPT's ``data/openwebtext/prepare.py``):
documents are concatenated with the tokenizer's end-of-text token after each, and the token
stream is cut into blocks of exactly ``block_size`` tokens, every token a target (attention
runs across a document boundary inside a block, as there). Nothing but the current piece of
text and one block is held in memory, so a corpus of any size streams through.

A corpus is one or more files, or directories (their ``.txt``, ``.text``, ``.md``, ``.jsonl``
files, ``.gz`` too, in name order). A plain-text file is one document, read ~64 KB of whole
lines at a time; a ``.jsonl`` file holds one document per line as ``{"text": ...}``. The stream
is endless: after the last file it starts again at the first (the token left over at the end
of a pass runs on into the next), so the step budget, not the corpus size, ends training, and
a resumed Trainer can skip the batches it already trained on whatever their number. The order
is the files' own (deterministic; shuffle a corpus beforehand if its order matters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from slmkit.data.readers import Lines, json_line
from slmkit.errors import DataError

CORPUS_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".txt.gz", ".jsonl.gz")
CHUNK_CHARS = 1 << 16  #: plain text is tokenised in pieces of about this many characters (whole lines)


def corpus_files(paths: Sequence[str | Path], flag: str = "--data") -> list[Path]:
    """The files of ``paths`` (files as given, directories' corpus files by name); a DataError names a
    path that is missing, an empty file, or a directory without corpus files."""
    if not paths:
        raise DataError(f"no corpus given: pass {flag} FILE (a text file, a jsonl of {{\"text\"}} rows, or a directory)")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(CORPUS_SUFFIXES))
            if not found:
                raise DataError(f"{flag} {p}: the directory holds no corpus files ({', '.join(CORPUS_SUFFIXES)})")
            files.extend(found)
        elif not p.exists():
            raise DataError(f"{flag} {p}: no such file or directory")
        else:
            files.append(p)
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{flag} {f}: the file is empty", "remove it from the corpus, or give it some text")
    return files


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".json"))


def pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces of one file: ~:data:`CHUNK_CHARS` of whole lines of a text file
    (the file is one document), or each ``{"text"}`` row of a jsonl file (one document per row)."""
    with Lines(path) as fh:
        if is_jsonl(path):
            for line in fh:
                if not line.strip():
                    continue
                where = f"{path}:{fh.lineno}"
                row = json_line(line, where)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(f"{where}: expected an object with a string 'text' field")
                if row["text"].strip():
                    yield row["text"], True
            return
        buf, size = [], 0
        for line in fh:
            buf.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(buf), False
                buf, size = [], 0
        yield "".join(buf), True


def document_end(tokenizer) -> int:
    """The token put after each document: the tokenizer's EOS (else its BOS)."""
    tid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if tid is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token to separate documents",
                        "pick a --tokenizer whose model defines eos_token")
    return int(tid)


def token_pass(files: Sequence[Path], tokenizer) -> Iterator[int]:
    """The token ids of one pass over ``files``: each document's tokens, then the end-of-document token."""
    end = document_end(tokenizer)
    for path in files:
        started = False
        for text, ends in pieces(path):
            if text.strip() or started:
                yield from tokenizer(text, add_special_tokens=False).input_ids
                started = True
            if ends and started:
                yield end
                started = False


def check_corpus(files: Sequence[Path], tokenizer, block_size: int, flag: str = "--data") -> None:
    """Raise a DataError unless one pass over ``files`` holds at least one block (reads only that far)."""
    n = 0
    for n, _ in enumerate(token_pass(files, tokenizer), 1):
        if n >= block_size:
            return
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if n == 0:
        raise DataError(f"{flag} {names}: the corpus holds no text", "pass text files with some content")
    raise DataError(f"{flag} {names}: the corpus has {n} tokens, fewer than one block of {block_size}",
                    "lower --block-size or add text")


def corpus_fingerprint(files: Sequence[Path]) -> list[dict]:
    """What identifies a corpus for a resume without reading it all: each file's path, size and the
    sha256 of its first MiB."""
    out = []
    for f in files:
        with open(f, "rb") as fh:
            head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
        out.append({"path": str(f.resolve()), "bytes": f.stat().st_size, "head_sha256": head})
    return out


class PackedTextStream(torch.utils.data.IterableDataset):
    """Endless ``{"input_ids", "labels"}`` blocks of ``block_size`` tokens (both ``(T,)`` int64, equal:
    the model shifts them) packed from ``files`` tokenised on the fly; see the module docstring."""

    def __init__(self, files: Sequence[Path], tokenizer, block_size: int):
        self.files = list(files)
        self.tokenizer = tokenizer
        self.block_size = block_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        block: list[int] = []
        while True:
            produced = False
            for tid in token_pass(self.files, self.tokenizer):
                block.append(tid)
                produced = True
                if len(block) == self.block_size:
                    ids = torch.tensor(block, dtype=torch.long)  # (T,)
                    yield {"input_ids": ids, "labels": ids.clone()}
                    block = []
            if not produced:  # a corpus emptied while training: stop rather than spin
                raise DataError(f"the corpus ({self.files[0]} ...) yields no tokens any more")

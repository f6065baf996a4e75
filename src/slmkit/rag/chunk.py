"""Reading documents (txt, md, jsonl) and splitting them into chunks of at most ``max_words`` words.

Paragraphs (blank-line separated) are packed greedily into chunks; a paragraph longer than a
chunk is cut into overlapping windows. In Markdown a heading starts a new chunk and is kept at
the head of every chunk of its section, so a retrieved chunk says where it came from.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class ChunkConfig:
    max_words: int = 200  #: words per chunk at most
    overlap_words: int = 30  #: words repeated between consecutive windows of one long paragraph

    def __post_init__(self):
        if self.max_words < 8:
            raise ConfigError(f"max_words must be >= 8, got {self.max_words}")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ConfigError(f"overlap_words must be in [0, max_words/2), got {self.overlap_words}")


@dataclass(frozen=True)
class Document:
    key: str  #: unique name: the file path, or ``file#id`` for a jsonl row
    text: str
    source: str  #: the file it came from
    markdown: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def read_documents(path: str | Path) -> list[Document]:
    """Documents in a file, or in every supported file under a directory (sorted by path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no .txt, .md or .jsonl files")
        return [d for f in files for d in read_documents(f)]
    if not path.is_file():
        raise DataError(f"document {path} does not exist")
    suffix = _suffix(path)
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text") from None
        return [Document(str(path), text, str(path), markdown=suffix != ".txt")] if text.strip() else []
    if suffix in JSONL_SUFFIXES:
        from slmkit.train.records import iter_rows

        docs = []
        for lineno, row in iter_rows(path):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: missing field 'text' (a string)", 'each line must be {"text": ..., "id": optional}')
            key = f"{path}#{row.get('id', lineno)}"
            title = row.get("title")
            text = f"{title}\n\n{row['text']}" if isinstance(title, str) and title else row["text"]
            if text.strip():
                docs.append(Document(key, text, str(path)))
        return docs
    raise DataError(f"{path}: unsupported document type {suffix or '(none)'}", "use .txt, .md or .jsonl files")


_HEADING = re.compile(r"^#{1,6}\s+\S")


def _sections(doc: Document) -> list[tuple[str, list[str]]]:
    """``(heading, paragraphs)`` pairs; plain text is one section without a heading."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    para: list[str] = []

    def flush():
        if para:
            sections[-1][1].append(" ".join(para))
            para.clear()

    for line in doc.text.splitlines():
        s = line.strip()
        if doc.markdown and _HEADING.match(s):
            flush()
            sections.append((s.lstrip("#").strip(), []))
        elif not s:
            flush()
        else:
            para.append(s)
    flush()
    return [(h, ps) for h, ps in sections if ps]


def chunk_document(doc: Document, cfg: ChunkConfig) -> list[str]:
    chunks = []
    for heading, paragraphs in _sections(doc):
        budget = cfg.max_words - (len(heading.split()) if heading else 0)
        budget = max(budget, cfg.max_words // 2)
        cur: list[str] = []
        out: list[list[str]] = []
        for p in paragraphs:
            words = p.split()
            if len(words) > budget:  # a long paragraph: overlapping windows of its own
                if cur:
                    out.append(cur)
                    cur = []
                step = budget - cfg.overlap_words
                for start in range(0, len(words), step):
                    out.append(words[start : start + budget])
                    if start + budget >= len(words):
                        break
            elif len(cur) + len(words) > budget:
                out.append(cur)
                cur = list(words)
            else:
                cur += words
        if cur:
            out.append(cur)
        prefix = f"{heading}\n" if heading else ""
        chunks += [prefix + " ".join(ws) for ws in out]
    return chunks

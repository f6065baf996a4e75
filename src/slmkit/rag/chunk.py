"""Reading documents (txt, md, jsonl) and splitting them into chunks the embedder reads whole.

Paragraphs (blank-line separated) are packed greedily into chunks; a paragraph longer than a
chunk is cut into overlapping windows. In Markdown a heading starts a new chunk and is kept at
the head of every chunk of its section, so a retrieved chunk says where it came from.

A chunk's size is counted in the embedder's tokens (its prompt and special tokens included) when
the indexer passes the embedder's counter, and bounded by ``max_tokens`` and the embedder's own
limit (``max_seq_length``): a chunk over it would be cut silently by the encoder, so each packed
chunk is checked with the real tokenizer and split again until it fits. Without a counter, chunks
are bounded by ``max_words`` words.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class ChunkConfig:
    max_words: int = 200  #: words per chunk at most, when no token counter is given
    overlap_words: int = 30  #: words repeated between consecutive windows of one long paragraph
    max_tokens: int = 0  #: embedder tokens per chunk at most (prompt and special tokens included); 0: the embedder's limit

    def __post_init__(self):
        if self.max_words < 8:
            raise ConfigError(f"max_words must be >= 8, got {self.max_words}")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ConfigError(f"overlap_words must be in [0, max_words/2), got {self.overlap_words}")
        if self.max_tokens and self.max_tokens < 16:
            raise ConfigError(f"max_tokens must be 0 (the embedder's limit) or >= 16, got {self.max_tokens}")


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
        from slmkit.data.readers import iter_jsonl

        docs = []
        for lineno, row in iter_jsonl(path):
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


def chunk_document(doc: Document, cfg: ChunkConfig, count_tokens: Callable[[str], int] | None = None,
                   token_limit: int = 0) -> list[str]:
    """``doc``'s chunks: at most ``cfg.max_words`` words each, or, with ``count_tokens`` (the embedder's count of a
    text, its prompt and special tokens included), at most ``min(cfg.max_tokens, token_limit)`` tokens each
    (the non-zero ones). A single word over the token limit cannot be split: it is kept, with a warning."""
    if count_tokens is None:
        return _pack(doc, cfg.max_words, cfg.overlap_words, len)
    limit = min(x for x in (cfg.max_tokens, token_limit) if x) if (cfg.max_tokens or token_limit) else 0
    if not limit:
        raise ConfigError("chunking by tokens needs max_tokens or the embedder's token limit")
    base = count_tokens("")  # the prompt and special tokens every chunk carries
    if limit - base < 8:
        raise ConfigError(f"chunk token limit {limit} leaves fewer than 8 tokens after the embedder's prompt and special tokens ({base})")
    per_word: dict[str, int] = {}

    def cost(words: list[str]) -> int:  # additive per word: exact for WordPiece, an estimate for BPE (checked below)
        return base + sum(per_word.setdefault(w, max(count_tokens(w) - base, 1)) for w in words)

    out: list[str] = []
    for chunk in _pack(doc, limit, cfg.overlap_words, cost):
        out += _fit(chunk, limit, count_tokens, doc.key)
    return out


def _fit(chunk: str, limit: int, count_tokens: Callable[[str], int], where: str) -> list[str]:
    """``chunk`` split in halves (its heading line kept on each) until every piece is within ``limit`` tokens."""
    if count_tokens(chunk) <= limit:
        return [chunk]
    head, _, body = chunk.rpartition("\n")
    words = body.split()
    if len(words) < 2:
        log.warning("%s: a single word of %d tokens exceeds the embedder's %d; the encoder will cut it",
                    where, count_tokens(chunk), limit)
        return [chunk]
    prefix = f"{head}\n" if head else ""
    mid = len(words) // 2
    return [*_fit(prefix + " ".join(words[:mid]), limit, count_tokens, where),
            *_fit(prefix + " ".join(words[mid:]), limit, count_tokens, where)]


def _pack(doc: Document, limit: int, overlap: int, cost: Callable[[list[str]], int]) -> list[str]:
    """Paragraphs packed greedily into chunks of ``cost <= limit``; a longer paragraph in overlapping windows
    (``overlap`` words repeated); a Markdown heading leads each chunk of its section."""
    chunks = []
    for heading, paragraphs in _sections(doc):
        head = heading.split() if heading else []
        budget = max(limit - (cost(head) - cost([]) if head else 0), limit // 2)
        cur: list[str] = []
        out: list[list[str]] = []
        for p in paragraphs:
            words = p.split()
            if cost(words) > budget:  # a long paragraph: overlapping windows of its own
                if cur:
                    out.append(cur)
                    cur = []
                out += _windows(words, budget, overlap, cost)
            elif cost(cur + words) > budget:
                out.append(cur)
                cur = list(words)
            else:
                cur += words
        if cur:
            out.append(cur)
        prefix = f"{heading}\n" if heading else ""
        chunks += [prefix + " ".join(ws) for ws in out]
    return chunks


def _windows(words: list[str], budget: int, overlap: int, cost: Callable[[list[str]], int]) -> list[list[str]]:
    """Greedy windows of ``words`` of ``cost <= budget`` (at least one word each), consecutive ones sharing
    up to ``overlap`` words."""
    out, start = [], 0
    while start < len(words):
        end = start + 1
        while end < len(words) and cost(words[start : end + 1]) <= budget:
            end += 1
        out.append(words[start:end])
        if end >= len(words):
            break
        start = max(end - overlap, start + 1)
    return out

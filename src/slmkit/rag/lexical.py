"""Lexical retrieval: Okapi BM25 over an index's chunks, kept beside the vectors.

BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond",
Eq. 3.15; Lucene's variant of the IDF) is computed by the ``bm25s`` package (Lù 2024,
arXiv:2407.03618: scores precomputed into a sparse matrix at indexing time). Text is lower-cased,
cut into ``\\w\\w+`` tokens, English stop words dropped and words Snowball-stemmed, so "periods"
matches "period".

On disk the BM25 matrix lives in ``bm25/`` inside the index directory, covering the index's live
chunks (``bm25/rows.npy`` maps its documents to chunk numbers). It is rebuilt at the end of every
``rag index`` run that changes the chunks; an index whose ``bm25/`` is missing or stale (a run
killed before it finished) has it rebuilt in memory when opened.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
ROWS = "rows.npy"


@dataclass(frozen=True)
class BM25Config:
    k1: float = 1.5  #: term-frequency saturation (Robertson & Zaragoza 2009, Sec. 3.4; 1.2-2.0 usual)
    b: float = 0.75  #: document-length normalisation in [0, 1]
    stem: bool = True  #: Snowball (Porter 2) stemming of query and document words
    stopwords: str = "en"  #: stop-word list dropped before scoring ("" keeps every word)

    def __post_init__(self):
        if self.k1 < 0:
            raise ConfigError(f"BM25 k1 must be >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ConfigError(f"BM25 b must be in [0, 1], got {self.b}")


def tokenize(texts: list[str], cfg: BM25Config) -> list[list[str]]:
    """The words BM25 counts: lower-cased ``\\w\\w+`` tokens, stop words dropped, stemmed."""
    import bm25s

    stemmer = None
    if cfg.stem:
        import snowballstemmer

        stemmer = snowballstemmer.stemmer("english")
    return bm25s.tokenize(list(texts), stopwords=cfg.stopwords or None, stemmer=stemmer, return_ids=False,
                          show_progress=False)


class BM25Index:
    """BM25 scores of queries against a fixed set of chunk rows."""

    def __init__(self, model, rows: np.ndarray, cfg: BM25Config):
        self.model = model  # a bm25s.BM25
        self.rows = rows  # (N,) int64: chunk number of each BM25 document
        self.cfg = cfg

    @classmethod
    def build(cls, texts: list[str], rows: list[int], cfg: BM25Config) -> BM25Index:
        import bm25s

        model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method="lucene")
        tokens = tokenize(texts, cfg)
        if not any(tokens):
            raise DataError("no indexable words in the documents (every word is a stop word or shorter than 2 letters)")
        model.index(tokens, show_progress=False)
        return cls(model, np.asarray(rows, dtype=np.int64), cfg)

    def scores(self, query: str, total: int) -> np.ndarray:
        """BM25 score of every chunk (shape ``(total,)``); chunks outside this index score 0."""
        out = np.zeros(total, dtype=np.float32)
        words = [w for w in tokenize([query], self.cfg)[0] if w in self.model.vocab_dict]
        if words:
            out[self.rows] = self.model.get_scores(words)
        return out

    # ------------------------------------------------------------------ disk

    def save(self, root: Path) -> None:
        """Write to ``root/bm25`` (a temp directory renamed into place)."""
        tmp = root / f".{BM25_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save(str(tmp), show_progress=False)
        np.save(tmp / ROWS, self.rows)
        (tmp / "slmkit-bm25.json").write_text(json.dumps(asdict(self.cfg)))
        old = root / f".{BM25_DIR}.old-{os.getpid()}"
        if (root / BM25_DIR).exists():
            (root / BM25_DIR).rename(old)
        tmp.rename(root / BM25_DIR)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, root: Path, cfg: BM25Config) -> BM25Index | None:
        """The saved BM25 of the index at ``root``, or None when missing or unreadable."""
        import bm25s

        d = root / BM25_DIR
        try:
            saved = BM25Config(**json.loads((d / "slmkit-bm25.json").read_text()))
            if saved != cfg:
                return None
            model = bm25s.BM25.load(str(d), show_progress=False, verbosity=0)
            rows = np.load(d / ROWS, allow_pickle=False)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return cls(model, rows.astype(np.int64), cfg)

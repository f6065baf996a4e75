"""Retrievers over an index: dense, BM25 and their fusion, plus optional reranking by a language model.

The retrievers are registered in :data:`RETRIEVERS` (:func:`retriever`, beside each ranking function):

* ``dense``: cosine similarity of sentence embeddings (:meth:`VectorIndex.search`).
* ``bm25``: Okapi BM25 over the chunks' words (:mod:`slmkit.rag.lexical`).
* ``hybrid``: both ranked lists fused by reciprocal rank fusion, ``score(d) = sum_r 1 / (k + rank_r(d))``
  with ``k = 60`` (Cormack, Clarke & Büttcher 2009, "Reciprocal Rank Fusion outperforms Condorcet and
  individual rank learning methods", Eq. 1); each list contributes its top ``depth`` chunks.

An index records its retriever in ``index.json`` (``rag index --retriever``); ``rag ask`` uses it.

Reranking (``rag ask --rerank``) rescores the top ``rerank_depth`` candidates with a language model
and keeps the best ``k``. No cross-encoder ships on PyPI with its weights, so the scorer is a causal
LM, registered in :data:`RERANKERS`:

* ``query-likelihood`` (default): the mean log-probability of the question's tokens given the
  passage, ``(1/|q|) sum_t log p(q_t | passage, q_<t)`` (the unsupervised passage re-ranker UPR of
  Sachan et al. 2022, arXiv:2204.07496, Eq. 2).
* ``relevance``: ``log p(Yes) - log p(No)`` to "Does the passage contain the answer?" (the pointwise
  prompt of :mod:`slmkit.collab.retrieval`, which computes it).

The final order fuses the retriever's rank and the LM's rank by the same reciprocal rank fusion, so a
weak LM reorders close calls rather than overriding the retriever (``rerank_fuse=False``: LM order only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slmkit.errors import ConfigError, DataError
from slmkit.rag.lexical import BM25Config
from slmkit.registry import Registry

if TYPE_CHECKING:
    from slmkit.backends.base import Backend
    from slmkit.rag.embed import Embedder
    from slmkit.rag.index import Hit, VectorIndex

log = logging.getLogger(__name__)

RRF_K = 60  # Cormack et al. 2009: k = 60 "was fixed during a pilot investigation and not altered"


@dataclass(frozen=True)
class RetrieverConfig:
    """How an index is searched; stored in its ``index.json`` under ``retriever``."""

    method: str = "hybrid"  #: a retriever of RETRIEVERS: dense | bm25 | hybrid
    rrf_k: int = RRF_K  #: reciprocal-rank-fusion constant
    depth: int = 50  #: hybrid: chunks each ranked list contributes to the fusion
    bm25: BM25Config = BM25Config()

    def __post_init__(self):
        RETRIEVERS.get(self.method)  # unknown name -> ConfigError listing the known ones
        if self.rrf_k < 1 or self.depth < 1:
            raise ConfigError(f"rrf_k and depth must be >= 1, got {self.rrf_k}, {self.depth}")

    @property
    def needs_embedder(self) -> bool:
        return RETRIEVERS.get(self.method).needs_embedder

    @property
    def needs_bm25(self) -> bool:
        return RETRIEVERS.get(self.method).needs_bm25

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RetrieverConfig:
        d = dict(d)
        return cls(**{**d, "bm25": BM25Config(**d.get("bm25", {}))})


@dataclass(frozen=True)
class RerankConfig:
    method: str = "query-likelihood"  #: a name in RERANKERS
    depth: int = 12  #: candidates rescored per question (the retriever's top ``depth``)
    fuse: bool = True  #: fuse the LM order with the retriever order by RRF (False: LM order only)
    max_passage_chars: int = 1500  #: passages are cut to this length for scoring

    def __post_init__(self):
        if self.depth < 1:
            raise ConfigError(f"rerank depth must be >= 1, got {self.depth}")
        RERANKERS.get(self.method)


def rrf(rankings: list[list[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion of ranked lists of item ids (best first): ``sum 1 / (k + rank)``, rank from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)  # Cormack et al. 2009, Eq. 1
    return fused


def _top(scores: np.ndarray, n: int, live: np.ndarray) -> list[int]:
    """Indices of the ``n`` best live scores, best first (ties: lower index first)."""
    s = np.where(live, scores, -np.inf)
    n = min(n, int(live.sum()))
    idx = np.argpartition(-s, n - 1)[:n] if n < len(s) else np.arange(len(s))
    return [int(i) for i in idx[np.lexsort((idx, -s[idx]))]][:n]


#: (cosine similarities (N,) or None, BM25 scores (N,) or None, n, live mask (N,), cfg) -> [(chunk, score)], best first
RankFn = Callable[[np.ndarray | None, np.ndarray | None, int, np.ndarray, "RetrieverConfig"], list[tuple[int, float]]]


@dataclass(frozen=True)
class Retriever:
    """A registered retriever: its ranking of one question's scores and which scores it needs."""

    run: RankFn
    needs_embedder: bool  #: needs the dense cosine similarities (the index's embedder)
    needs_bm25: bool  #: needs the BM25 scores
    summary: str = ""


RETRIEVERS: Registry[Retriever] = Registry("retriever")


def retriever(name: str, *, embedder: bool, bm25: bool, summary: str):
    """Register the decorated ranking ``fn(dense, bm25, n, live, cfg) -> [(chunk, score)]`` as retriever ``name``
    (``rag index --retriever NAME``); ``embedder`` / ``bm25``: the scores it needs (the others are None)."""
    def deco(fn: RankFn) -> RankFn:
        RETRIEVERS.add(name, Retriever(fn, embedder, bm25, summary))
        return fn

    return deco


@retriever("dense", embedder=True, bm25=False, summary="cosine similarity of sentence embeddings")
def dense_ranking(dense, bm25, n: int, live: np.ndarray, cfg: RetrieverConfig) -> list[tuple[int, float]]:
    return [(i, float(dense[i])) for i in _top(dense, n, live)]


@retriever("bm25", embedder=False, bm25=True, summary="Okapi BM25 over the chunks' words")
def bm25_ranking(dense, bm25, n: int, live: np.ndarray, cfg: RetrieverConfig) -> list[tuple[int, float]]:
    return [(i, float(bm25[i])) for i in _top(bm25, n, live)]


@retriever("hybrid", embedder=True, bm25=True, summary="dense + BM25, reciprocal rank fusion")
def hybrid_ranking(dense, bm25, n: int, live: np.ndarray, cfg: RetrieverConfig) -> list[tuple[int, float]]:
    """Each list's top ``max(depth, n)`` fused by RRF (Cormack et al. 2009, Eq. 1)."""
    fused = rrf([_top(dense, max(cfg.depth, n), live), _top(bm25, max(cfg.depth, n), live)], cfg.rrf_k)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def rank(index: VectorIndex, embedder: Embedder | None, questions: list[str], n: int,
         cfg: RetrieverConfig) -> list[list[Hit]]:
    """The best ``n`` chunks for each question by ``cfg.method``, best first; ``Hit.score`` is the
    cosine similarity (dense), the BM25 score (bm25) or the fused RRF score (hybrid)."""
    if len(index) == 0:
        raise DataError(f"index {index.root} holds no chunks", "index documents with `slmkit rag index DOCS... --output INDEX`")
    if cfg.needs_embedder:
        if embedder is None:
            raise ConfigError(f"retriever {cfg.method!r} needs the index's embedder")
        index.check_embedder(embedder)
    live = index.live_mask()
    dense = index.vectors @ embedder.embed_queries(questions).T if cfg.needs_embedder else None  # (N, Q) cosine, query prompt
    lexical = index.lexical() if cfg.needs_bm25 else None
    run = RETRIEVERS.get(cfg.method).run
    out = []
    for qi, q in enumerate(questions):
        bm25 = lexical.scores(q, len(index.chunks)) if lexical is not None else None  # (N,)
        ranked = run(dense[:, qi] if dense is not None else None, bm25, n, live, cfg)
        out.append([index.hit(i, score) for i, score in ranked])
    return out


# ---------------------------------------------------------------------- reranking

#: name -> fn(backend, question, passages) -> relevance scores (higher = more relevant)
RERANKERS: Registry[Callable[[Backend, str, list[str]], list[float]]] = Registry("reranker")


@RERANKERS.register("query-likelihood", "upr")
def query_likelihood(backend: Backend, question: str, passages: list[str]) -> list[float]:
    """Mean log p(question tokens | passage) (UPR, Sachan et al. 2022, Eq. 2)."""
    ctxs = [f"Passage: {p}\nPlease write a question based on this passage.\nQuestion:" for p in passages]
    scores = backend.score([" " + question] * len(ctxs), ctxs)
    return [s.total / max(len(s.logprobs), 1) for s in scores]


@RERANKERS.register("relevance", "yes-no")
def yes_no_relevance(backend: Backend, question: str, passages: list[str]) -> list[float]:
    """log p(Yes) - log p(No) that the passage contains the answer (slmkit.collab.retrieval)."""
    from slmkit.collab.retrieval import relevance_scores

    return relevance_scores(backend, question, passages)


def rerank(backend: Backend, question: str, hits: list[Hit], k: int, cfg: RerankConfig) -> list[Hit]:
    """The best ``k`` of ``hits`` after rescoring by ``cfg.method``; ``Hit.score`` becomes the LM score
    (``fuse=False``) or the RRF of the retriever and LM ranks (``fuse=True``)."""
    from dataclasses import replace

    if not hits:
        return []
    lm = RERANKERS.get(cfg.method)(backend, question, [h.text[: cfg.max_passage_chars] for h in hits])
    by_lm = sorted(range(len(hits)), key=lambda i: (-lm[i], i))
    if cfg.fuse:
        fused = rrf([list(range(len(hits))), by_lm])
        order = sorted(fused, key=lambda i: (-fused[i], i))
        return [replace(hits[i], score=fused[i]) for i in order[:k]]
    return [replace(hits[i], score=float(lm[i])) for i in by_lm[:k]]

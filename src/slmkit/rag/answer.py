"""Answer questions from an index: retrieve, optionally rerank and filter, then extract or generate, cite.

Pipeline of :func:`answer`, per question:

1. **Retrieve** the top ``k`` chunks with the index's own retriever (dense, BM25 or hybrid,
   :mod:`slmkit.rag.retrieve`); with ``rerank``, the top ``rerank.depth`` are rescored by the
   answering model and the best ``k`` kept. ``k = 0`` asks the bare question (the no-retrieval baseline).
2. **Filter** (``filter``): a small model drops passages it judges irrelevant before the answering
   model reads them (:func:`slmkit.collab.retrieval.filter_passages`); each answer reports how many
   passages were kept and the prompt's length.
3. **Answer**: generated from a prompt listing the chunks as ``[1] ...``, ``[2] ...`` (the model is
   asked to cite the numbers it used), or, with ``extractive``, the span of a source the model scores
   highest (:mod:`slmkit.rag.extract`). An extractive span whose mean log-probability per token is
   below ``extractive.min_score`` is not trusted: the answer is generated instead (the fallback), and
   kept only when it is found in a source (token F1 >= 0.5 against some window of a source, SQuAD's
   normalisation); otherwise the model **abstains**: ``answer`` is null and ``reason`` says why.

Every answer carries its ``sources`` and, when the answer text is in one of them, ``span``
(``{id, start, end}``: character offsets into that source's text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from slmkit.backends.base import Backend, GenParams
from slmkit.collab.cascade import normalize_answer, token_f1
from slmkit.collab.retrieval import FilterConfig, filter_passages
from slmkit.errors import ConfigError
from slmkit.rag.embed import Embedder
from slmkit.rag.extract import SYSTEM_RAG, ExtractConfig, Span, find_span, source_messages, words
from slmkit.rag.index import Hit, VectorIndex
from slmkit.rag.retrieve import RerankConfig, rank, rerank

SYSTEM_PLAIN = "Answer the question with a short answer."
GROUNDED_F1 = 0.5  #: a generated answer is "in a source" when some window of it scores this token F1


@dataclass(frozen=True)
class RAGConfig:
    k: int = 4  #: chunks retrieved per question (0 = no retrieval)
    max_new_tokens: int = 64
    max_source_chars: int = 2000  #: each source is cut to this many characters in the prompt
    system: str | None = None  #: override the instruction
    rerank: RerankConfig | None = None  #: rescore the retriever's candidates with the answering model
    extractive: ExtractConfig | None = None  #: answer with a span of a source (generation as fallback)
    filter: FilterConfig | None = None  #: a small model drops irrelevant passages first (needs ``small``)

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if self.max_new_tokens < 1 or self.max_source_chars < 1:
            raise ConfigError("max_new_tokens and max_source_chars must be >= 1")
        if self.k == 0 and (self.extractive or self.rerank or self.filter):
            raise ConfigError("extractive answers, --rerank and --filter need retrieved passages (k >= 1)")


@dataclass
class Answer:
    question: str
    answer: str | None  #: None: the model abstained (see ``reason``)
    sources: list[Hit] = field(default_factory=list)
    cited: list[str] = field(default_factory=list)  #: ids of the sources cited as [n] in the answer
    span: dict | None = None  #: {id, start, end}: where in a source the answer is (character offsets)
    mode: str = "generated"  #: generated | extractive | fallback (generated after a weak span) | abstained
    reason: str | None = None  #: why the model abstained
    candidate: dict | None = None  #: the best extractive span {text, score} (also when not used)
    retrieved: int | None = None  #: passages retrieved before the filter
    prompt_chars: int = 0  #: characters of the answering prompt (sources + question)
    prompt_tokens: int | None = None  #: its tokens, when the answering model's tokenizer is local

    def to_dict(self) -> dict:
        d = {
            "question": self.question,
            "answer": self.answer,
            "sources": [{"id": h.id, "text": h.text, "score": h.score} for h in self.sources],
            "span": self.span,
            "cited": self.cited,
            "mode": self.mode,
            "prompt_chars": self.prompt_chars,
            "prompt_tokens": self.prompt_tokens,
        }
        for key in ("reason", "candidate", "retrieved"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def build_prompt(question: str, hits: list[Hit], cfg: RAGConfig) -> list[dict]:
    """Chat messages: the instruction, the numbered sources and the question."""
    if not hits:
        return [{"role": "system", "content": cfg.system or SYSTEM_PLAIN}, {"role": "user", "content": question}]
    return source_messages(question, [h.text for h in hits], cfg.system or SYSTEM_RAG, cfg.max_source_chars)


_CITE = re.compile(r"\[(\d+)\]")


def cited_sources(text: str, hits: list[Hit]) -> list[str]:
    nums = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(hits) and hits[n - 1].id not in nums:
            nums.append(hits[n - 1].id)
    return nums


def locate(text: str, hits: list[Hit]) -> dict | None:
    """``{id, start, end}`` of the window of a source that best matches ``text`` (token F1 >= 0.5), else None."""
    target = normalize_answer(_CITE.sub(" ", text))
    n = len(target.split())
    if not n:
        return None
    best, where = 0.0, None
    for h in hits:
        ws = words(h.text)
        for width in {max(1, n - 1), n, n + 1}:
            for i in range(0, max(1, len(ws) - width + 1)):
                span = ws[i: i + width]
                if not span:
                    continue
                f = token_f1(h.text[span[0][0]: span[-1][1]], target)
                if f > best:
                    best, where = f, {"id": h.id, "start": span[0][0], "end": span[-1][1]}
    return where if best >= GROUNDED_F1 else None


def retrieve(index: VectorIndex | None, embedder: Embedder | None, questions: list[str], k: int,
             rerank_with: Backend | None = None, rerank_cfg: RerankConfig | None = None) -> list[list[Hit]]:
    """Top-``k`` chunks per question by the index's retriever; with ``rerank_cfg``, the retriever's top
    ``rerank_cfg.depth`` rescored by ``rerank_with`` and cut to ``k``."""
    if k == 0:
        return [[] for _ in questions]
    if index is None:
        raise ConfigError("retrieval (k > 0) needs an index")
    depth = max(k, rerank_cfg.depth) if rerank_cfg is not None else k
    hits = rank(index, embedder, questions, depth, index.retriever)
    if rerank_cfg is None:
        return hits
    if rerank_with is None:
        raise ConfigError("reranking needs a model to score the passages")
    return [rerank(rerank_with, q, hs, k, rerank_cfg) for q, hs in zip(questions, hits)]


def _prompt_size(backend: Backend, messages: list[dict]) -> tuple[int, int | None]:
    chars = sum(len(m["content"]) for m in messages)
    tok = getattr(backend, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        return chars, None
    from slmkit.backends.hf import render_prompt

    return chars, len(tok(render_prompt(tok, messages), add_special_tokens=False).input_ids)


def _extractive(backend: Backend, a: Answer, cfg: RAGConfig) -> bool:
    """Fill ``a`` from the best span; False when the span is too weak (the caller generates instead)."""
    span: Span | None = find_span(backend, a.question, [h.text for h in a.sources], cfg.extractive)
    if span is None:
        return False
    a.candidate = {"text": span.text, "score": span.score}
    if span.score < cfg.extractive.min_score:
        return False
    a.answer, a.mode = span.text, "extractive"
    a.span = {"id": a.sources[span.source].id, "start": span.start, "end": span.end}
    a.cited = [a.span["id"]]
    return True


def answer(
    backend: Backend, index: VectorIndex | None, embedder: Embedder | None, questions: list[str], cfg: RAGConfig,
    batch_size: int = 8, small: Backend | None = None,
) -> list[Answer]:
    """Answer each question with ``cfg.k`` retrieved sources (greedy decoding); see the module docstring.

    Generated answers go to the backend ``batch_size`` at a time (a local model decodes a batch
    in about the time of one question); the answers equal answering one at a time.
    ``small`` is the filtering model of ``cfg.filter``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.filter is not None and small is None:
        raise ConfigError("the retrieval filter needs a small model (--filter MODEL)")
    hits = retrieve(index, embedder, questions, cfg.k, backend, cfg.rerank)
    out = [Answer(q, None, hs) for q, hs in zip(questions, hits)]
    if cfg.filter is not None:
        for a in out:
            keep, _ = filter_passages(small, a.question, [h.text for h in a.sources], cfg.filter)
            a.retrieved, a.sources = len(a.sources), [a.sources[i] for i in keep]
    todo = [a for a in out if not (cfg.extractive is not None and a.sources and _extractive(backend, a, cfg))]
    prompts = [build_prompt(a.question, a.sources, cfg) for a in todo]
    texts: list[str] = []
    params = GenParams(max_new_tokens=cfg.max_new_tokens)
    for b in range(0, len(prompts), batch_size):
        texts += [c.text.strip() for c in backend.generate(prompts[b: b + batch_size], params)]
    for a, text in zip(todo, texts):
        a.answer, a.cited, a.span = text, cited_sources(text, a.sources), locate(text, a.sources)
        if cfg.extractive is not None:
            a.mode = "fallback"
            if a.span is None:
                score = a.candidate["score"] if a.candidate else float("-inf")
                a.answer, a.mode = None, "abstained"
                a.reason = (f"no retrieved passage supports an answer: the best span scored {score:.2f} nats/token "
                            f"(< {cfg.extractive.min_score}) and the generated answer {text[:80]!r} is not in a source")
    for a in out:
        a.prompt_chars, a.prompt_tokens = _prompt_size(backend, build_prompt(a.question, a.sources, cfg))
    return out

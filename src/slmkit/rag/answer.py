"""Answer questions from an index: retrieve top-k chunks, number them in the prompt, generate, cite.

The prompt lists the retrieved chunks as ``[1] ...``, ``[2] ...`` and asks the model to answer
from them and cite the numbers it used. ``k = 0`` asks the bare question (the no-retrieval
baseline). Any :class:`~slmkit.backends.Backend` answers: a local model or an HTTP endpoint.
The answer's ``cited`` list holds the sources whose numbers appear in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from slmkit.backends.base import Backend, GenParams
from slmkit.errors import ConfigError
from slmkit.rag.embed import Embedder
from slmkit.rag.index import Hit, VectorIndex

SYSTEM_RAG = (
    "Answer the question using the numbered sources. Reply with a short answer, then cite the "
    "sources you used like [1]. If the sources do not contain the answer, say you do not know."
)
SYSTEM_PLAIN = "Answer the question with a short answer."


@dataclass(frozen=True)
class RAGConfig:
    k: int = 4  #: chunks retrieved per question (0 = no retrieval)
    max_new_tokens: int = 64
    max_source_chars: int = 2000  #: each source is cut to this many characters in the prompt
    system: str | None = None  #: override the instruction

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if self.max_new_tokens < 1 or self.max_source_chars < 1:
            raise ConfigError("max_new_tokens and max_source_chars must be >= 1")


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Hit] = field(default_factory=list)
    cited: list[str] = field(default_factory=list)  #: ids of the sources cited as [n] in the answer

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "sources": [{"id": h.id, "text": h.text, "score": h.score} for h in self.sources],
            "cited": self.cited,
        }


def build_prompt(question: str, hits: list[Hit], cfg: RAGConfig) -> list[dict]:
    """Chat messages: the instruction, the numbered sources and the question."""
    if not hits:
        return [{"role": "system", "content": cfg.system or SYSTEM_PLAIN}, {"role": "user", "content": question}]
    sources = "\n\n".join(f"[{i}] {h.text[: cfg.max_source_chars]}" for i, h in enumerate(hits, 1))
    return [
        {"role": "system", "content": cfg.system or SYSTEM_RAG},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
    ]


_CITE = re.compile(r"\[(\d+)\]")


def cited_sources(text: str, hits: list[Hit]) -> list[str]:
    nums = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(hits) and hits[n - 1].id not in nums:
            nums.append(hits[n - 1].id)
    return nums


def retrieve(index: VectorIndex, embedder: Embedder, questions: list[str], k: int) -> list[list[Hit]]:
    if k == 0:
        return [[] for _ in questions]
    index.check_embedder(embedder)
    return index.search(embedder.embed_queries(questions), k)


def answer(
    backend: Backend, index: VectorIndex | None, embedder: Embedder | None, questions: list[str], cfg: RAGConfig,
    batch_size: int = 8,
) -> list[Answer]:
    """Answer each question with ``cfg.k`` retrieved sources (greedy decoding).

    Questions go to the backend ``batch_size`` at a time (a local model decodes a batch
    in about the time of one question); the answers equal answering one at a time.
    """
    if cfg.k > 0 and (index is None or embedder is None):
        raise ConfigError("retrieval (k > 0) needs an index and its embedder")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    hits = retrieve(index, embedder, questions, cfg.k) if cfg.k else [[] for _ in questions]
    params = GenParams(max_new_tokens=cfg.max_new_tokens)
    prompts = [build_prompt(q, hs, cfg) for q, hs in zip(questions, hits)]
    texts: list[str] = []
    for b in range(0, len(prompts), batch_size):
        texts += [c.text.strip() for c in backend.generate(prompts[b : b + batch_size], params)]
    return [Answer(q, text, hs, cited_sources(text, hs)) for q, hs, text in zip(questions, hits, texts)]

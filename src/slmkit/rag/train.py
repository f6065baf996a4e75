"""Training conversations that teach a small model to answer from retrieved passages (``slmkit sft --rag``).

Each question of a QA file becomes one conversation in exactly the layout ``rag ask`` prompts with
(:func:`slmkit.rag.answer.build_prompt`): the numbered sources are the passage holding the answer
(the *gold* chunk) among ``k - 1`` distractors, the retriever's own best wrong chunks (hard
negatives, as in the retrieval-augmented fine-tuning of RAFT, Zhang et al. 2024, arXiv:2403.10131,
and RA-DIT, Lin et al. 2023, arXiv:2310.01352), with the gold placed at a seeded random position;
the assistant's reply is the gold answer and its citation, ``"<answer> [n]"``.

The gold chunk is a chunk that contains the answer text (case-insensitive): among the chunks of the
row's ``passage_id`` document when the row names one (``<file>#<id>`` keys of a jsonl corpus), else
among the retrieved chunks. Rows whose answer is in no such chunk are skipped and counted.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, DataError
from slmkit.rag.answer import RAGConfig, build_prompt
from slmkit.rag.embed import Embedder
from slmkit.rag.index import Hit, VectorIndex
from slmkit.rag.retrieve import rank


@dataclass(frozen=True)
class RAGTrainConfig:
    k: int = 4  #: sources per training prompt: the gold chunk and k - 1 distractors
    search: int = 20  #: chunks retrieved per question to find distractors (and the gold without passage_id)
    seed: int = 0  #: places the gold among the distractors
    max_source_chars: int = 2000

    def __post_init__(self):
        if self.k < 1 or self.search < self.k:
            raise ConfigError(f"need k >= 1 and search >= k, got k={self.k}, search={self.search}")


@dataclass
class RAGTrainSet:
    conversations: list[list[dict]]
    skipped: int  #: rows whose answer is in no candidate chunk


def read_qa(path: str | Path, limit: int = 0) -> list[dict]:
    """Rows ``{"question": str, "answer": str, "passage_id": optional}`` (a DataError names file, line and field)."""
    from slmkit.train.records import iter_rows

    rows = []
    for lineno, row in iter_rows(path, limit):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{path}:{lineno}: missing field '{key}' (a non-empty string)",
                                'each line must be {"question": ..., "answer": ..., "passage_id": optional}')
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no questions")
    return rows


def _doc_hits(index: VectorIndex, passage_id) -> list[Hit]:
    live = index.live_mask()
    suffix = f"#{passage_id}"
    return [index.hit(i, 1.0) for i, c in enumerate(index.chunks) if live[i] and c["doc"].endswith(suffix)]


def named_passages(index: VectorIndex, rows: list[dict]) -> list[tuple[object, str]]:
    """``(passage_id, chunk text)`` of every live chunk of the passages the rows name (``passage_id``), in
    the order the rows first name them: the text :func:`cloze_rows` may draw from without reaching
    passages the QA file does not cover (a held-out split's, say)."""
    seen: dict[object, None] = {}
    for r in rows:
        if "passage_id" in r:
            seen.setdefault(r["passage_id"], None)
    return [(pid, h.text) for pid in seen for h in _doc_hits(index, pid)]


def rag_conversations(rows: list[dict], index: VectorIndex, embedder: Embedder | None,
                      cfg: RAGTrainConfig = RAGTrainConfig()) -> RAGTrainSet:
    """One training conversation per row whose gold chunk is found (see the module docstring)."""
    rng = random.Random(cfg.seed)
    retrieved = rank(index, embedder, [r["question"] for r in rows], cfg.search, index.retriever)
    prompt_cfg = RAGConfig(k=cfg.k, max_source_chars=cfg.max_source_chars)
    convs, skipped = [], 0
    for row, hits in zip(rows, retrieved):
        ans = row["answer"].strip()
        pool = _doc_hits(index, row["passage_id"]) if "passage_id" in row else hits
        anchor = (row.get("context") or ans).lower()  # a cloze row's own sentence picks its chunk
        gold = next((h for h in pool if anchor in h.text.lower()), None)
        if gold is None:
            skipped += 1
            continue
        distractors = [h for h in hits if h.id != gold.id and h.doc != gold.doc][: cfg.k - 1]
        sources = list(distractors)
        pos = rng.randint(0, len(sources))
        sources.insert(pos, gold)
        convs.append([*build_prompt(row["question"], sources, prompt_cfg),
                      {"role": "assistant", "content": f"{ans} [{pos + 1}]"}])
    if not convs:
        raise DataError(f"none of the {len(rows)} answers occurs in a chunk of the index",
                        "index the passages the questions were written on")
    return RAGTrainSet(convs, skipped)


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"“(])")
_TOKEN = re.compile(r"[\w'’\-]+(?:[.,]\d+)*")
_STOP = frozenset("a an the of in on at to for by with from and or but as is are was were be been that this these those "
                  "it its his her their which who whom whose what when where while than then there also not".split())


def _answer_spans(sentence: str) -> list[tuple[int, int]]:
    """Candidate answers in ``sentence`` as character spans: runs of capitalised words or numbers (not the
    sentence's first word alone), else content-word runs of 1-3 words; never a stop word at either end,
    never across punctuation (a run's words are separated by spaces only)."""
    toks = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(sentence)]

    def joined(a: int, b: int) -> bool:  # tokens a..b are one run of words
        return all(not sentence[toks[k][1]: toks[k + 1][0]].strip() for k in range(a, b))

    named, i = [], 0
    while i < len(toks):
        j = i
        while j < len(toks) and (toks[j][2][0].isupper() or toks[j][2][0].isdigit()) and (j == i or joined(j - 1, j)):
            j += 1
        if j > i + (i == 0):  # the sentence's capitalised first word alone is no name
            named.append((toks[i][0], toks[j - 1][1]))
        i = max(j, i + 1)
    if named:
        return named
    content = [k for k, t in enumerate(toks) if t[2].lower() not in _STOP and len(t[2]) > 2]
    return [(toks[a][0], toks[b][1]) for a in content for b in content if 0 <= b - a < 3 and joined(a, b)]


def cloze_rows(passages: list[tuple[object, str]], per_chunk: int, seed: int = 0, min_words: int = 8) -> list[dict]:
    """Extra training questions written from the passages themselves: a sentence with one phrase blanked out
    (``"__ is by far the most important source of energy"`` -> ``"the sun"``), the phrase being the answer.

    ``passages`` are ``(passage_id, chunk text)`` (:func:`named_passages`); up to ``per_chunk`` sentences
    of at least ``min_words`` words are drawn from each (seeded), one blank per sentence, preferring names
    and numbers. The rows have the shape :func:`read_qa` returns plus ``context`` (the whole sentence, by
    which :func:`rag_conversations` finds the chunk it came from), so they become conversations with
    retrieved distractors like any QA row. Cloze questions are the self-supervised reading task of Lewis et al.
    2019 (unsupervised QA by cloze translation, arXiv:1906.04980), used here to give a small QA file
    more examples of finding and copying a span."""
    if per_chunk < 1 or min_words < 2:
        raise ConfigError(f"need per_chunk >= 1 and min_words >= 2, got {per_chunk}, {min_words}")
    rng = random.Random(seed)
    rows = []
    for pid, text in passages:
        sentences = [s.strip() for s in _SENTENCE.split(text) if len(s.split()) >= min_words]
        for sentence in rng.sample(sentences, min(per_chunk, len(sentences))):
            spans = _answer_spans(sentence)
            if not spans:
                continue
            a, b = rng.choice(spans)
            rows.append({"question": f"{sentence[:a]}__{sentence[b:]}".strip(), "answer": sentence[a:b], "passage_id": pid,
                         "context": sentence})
    return rows


def training_rows(rows: list[dict], index: VectorIndex, cloze_per_chunk: int = 0, seed: int = 0) -> tuple[list[dict], int]:
    """The QA rows plus ``cloze_per_chunk`` cloze rows per chunk of the passages they name, and how many were added."""
    extra = cloze_rows(named_passages(index, rows), cloze_per_chunk, seed) if cloze_per_chunk else []
    return rows + extra, len(extra)

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
        gold = next((h for h in pool if ans.lower() in h.text.lower()), None)
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

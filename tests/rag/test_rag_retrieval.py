"""RAG retrieval: BM25 (persisted, stale-safe), hybrid by reciprocal rank fusion, LM reranking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmkit.backends.base import TokenScores
from slmkit.errors import ConfigError, DataError
from slmkit.rag.embed import Embedder
from slmkit.rag.index import Hit, VectorIndex, build_index
from slmkit.rag.retrieve import RETRIEVERS, RerankConfig, RetrieverConfig, rank, rerank, retriever, rrf

NOTES = {
    "n0": "Zebras of the Karoo have faint stripes and graze at dawn.",
    "n1": "The lighthouse keeper painted the lamp room bright orange in 1893.",
    "n2": "Sourdough bread needs a lively starter and a long, cool proof.",
    "n3": "Marathon runners taper their training in the final weeks.",
    "n4": "Honey bees dance to tell their sisters where the flowers are.",
    "n5": "Watercolour painters wet the paper before laying a wash.",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load()


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in NOTES.items()))
    return path


def test_rrf_follows_cormack_et_al():
    fused = rrf([[7, 8, 9], [9, 7]], k=60)
    assert fused[7] == pytest.approx(1 / 61 + 1 / 62) and fused[9] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[8] == pytest.approx(1 / 62)
    assert max(fused, key=fused.get) == 7  # first and second beats third and first
    with pytest.raises(ConfigError, match="unknown retriever 'sparse'"):
        RetrieverConfig(method="sparse")


def test_bm25_index_persists_stems_and_never_returns_removed_chunks(embedder, corpus, tmp_path):
    build_index([corpus], tmp_path / "idx", embedder, retriever=RetrieverConfig(method="bm25"))
    index = VectorIndex.open(tmp_path / "idx")
    assert index.retriever.method == "bm25" and (tmp_path / "idx" / "bm25" / "rows.npy").is_file()
    assert index.meta["bm25_built"]["count"] == len(NOTES)
    hits = rank(index, None, ["lighthouses painted orange"], 2, index.retriever)[0]  # "lighthouses" stems to "lighthous"
    assert hits[0].doc.endswith("#n1") and hits[0].score > hits[1].score >= 0
    # BM25 from the saved matrix equals BM25 built from scratch
    fresh = VectorIndex.open(tmp_path / "idx")
    fresh.meta["bm25_built"] = None  # stale: rebuilt in memory
    s_saved = index.lexical().scores("bees dance flowers", len(index.chunks))
    s_fresh = fresh.lexical().scores("bees dance flowers", len(fresh.chunks))
    assert np.allclose(s_saved, s_fresh) and int(np.argmax(s_saved)) == 4
    # a changed document: its old chunk is removed and BM25 is rebuilt over the live chunks
    rows = [{"id": k, "text": v} for k, v in NOTES.items()]
    rows[1]["text"] = "The keeper later painted the lamp room green."
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index([corpus], tmp_path / "idx", embedder)  # no --retriever: keeps bm25
    index = VectorIndex.open(tmp_path / "idx")
    assert index.retriever.method == "bm25" and index.meta["bm25_built"]["removed"] == 1
    hits = rank(index, None, ["orange lamp room"], 6, index.retriever)[0]
    assert all("orange" not in h.text for h in hits) and hits[0].text.endswith("green.")


def test_hybrid_is_rrf_of_dense_and_bm25_ranks(embedder, corpus, tmp_path):
    build_index([corpus], tmp_path / "idx", embedder, retriever=RetrieverConfig(method="hybrid", depth=6))
    index = VectorIndex.open(tmp_path / "idx")
    q = "Who painted the lamp room orange?"
    dense = rank(index, embedder, [q], 6, RetrieverConfig(method="dense"))[0]
    lexical = rank(index, embedder, [q], 6, RetrieverConfig(method="bm25"))[0]
    hybrid = rank(index, embedder, [q], 3, index.retriever)[0]
    ids = [c["id"] for c in index.chunks]
    num = {f"{c['doc']}@{c['n']}": c["id"] for c in index.chunks}
    want = rrf([[num[h.id] for h in dense], [num[h.id] for h in lexical]])
    assert [num[h.id] for h in hybrid] == sorted(want, key=lambda i: (-want[i], ids.index(i)))[:3]
    assert [h.score for h in hybrid] == pytest.approx([want[num[h.id]] for h in hybrid])
    assert hybrid[0].doc.endswith("#n1")


def test_old_index_without_retriever_is_dense_and_empty_index_is_an_error(embedder, corpus, tmp_path):
    build_index([corpus], tmp_path / "idx", embedder, retriever=RetrieverConfig(method="dense"))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    del meta["retriever"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    index = VectorIndex.open(tmp_path / "idx")
    assert index.retriever.method == "dense" and not (tmp_path / "idx" / "bm25").exists()
    meta["retriever"] = {"method": "fuzzy"}
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="field 'retriever'"):
        VectorIndex.open(tmp_path / "idx")
    empty = VectorIndex(tmp_path / "empty", {**meta, "retriever": {"method": "dense"}, "count": 0, "removed": []},
                        [], np.zeros((0, 384), np.float32))
    with pytest.raises(DataError, match="holds no chunks"):
        rank(empty, embedder, ["q"], 2, empty.retriever)


class Scripted:
    """A backend whose question log-likelihood is high for passages containing ``word``."""

    name = "scripted"

    def __init__(self, word):
        self.word = word

    def score(self, texts, contexts=None):
        return [TokenScores(["a", "b"], [-0.1, -0.1] if self.word in c else [-5.0, -5.0]) for c in contexts]


def test_rerank_by_query_likelihood_moves_the_relevant_passage_up():
    hits = [Hit(f"d{i}@0", f"d{i}", f"passage {i} " + ("about orange paint" if i == 3 else "about nothing"), 1.0 - i / 10)
            for i in range(5)]
    lm_only = rerank(Scripted("orange"), "who painted it orange?", hits, 2, RerankConfig(fuse=False))
    assert lm_only[0].id == "d3@0" and lm_only[0].score == pytest.approx(-0.1) and len(lm_only) == 2
    fused = rerank(Scripted("orange"), "q", hits, 5, RerankConfig(fuse=True))
    # d0 (ranks 1, 2) stays first; d3 (ranks 4, 1) passes d1 (ranks 2, 3): 1/64 + 1/61 > 1/62 + 1/63
    assert [h.id for h in fused][:2] == ["d0@0", "d3@0"]
    with pytest.raises(ConfigError, match="unknown reranker"):
        RerankConfig(method="cross")


def test_a_new_retriever_is_one_registered_function(embedder, corpus, tmp_path, monkeypatch):
    """A retriever registered beside its ranking function is found by name (RetrieverConfig, an index's retriever,
    rank) and gets only the scores it asks for. Here CombSUM of min-max normalised dense and BM25 scores
    (Fox & Shaw 1994), and a BM25-only one that records what it was given."""
    monkeypatch.setattr(RETRIEVERS, "_items", dict(RETRIEVERS._items))

    def unit(s):
        return (s - s.min()) / max(float(s.max() - s.min()), 1e-12)

    @retriever("seam-combsum", embedder=True, bm25=True, summary="CombSUM of min-max normalised scores")
    def combsum(dense, bm25, n, live, cfg):
        s = np.where(live, unit(dense) + unit(bm25), -np.inf)
        return [(int(i), float(s[i])) for i in np.argsort(-s, kind="stable")[: min(n, int(live.sum()))]]

    given = []

    @retriever("seam-bm25-only", embedder=False, bm25=True, summary="BM25's best chunk")
    def bm25_only(dense, bm25, n, live, cfg):
        given.append(dense)
        return [(int(np.argmax(bm25)), float(bm25.max()))]

    build_index([corpus], tmp_path / "idx", embedder, retriever=RetrieverConfig(method="seam-combsum"))
    index = VectorIndex.open(tmp_path / "idx")
    assert index.retriever.method == "seam-combsum" and (tmp_path / "idx" / "bm25" / "rows.npy").is_file()
    hits = rank(index, embedder, ["Who painted the lamp room orange?"], 3, index.retriever)[0]
    assert hits[0].doc.endswith("#n1") and 2.0 >= hits[0].score >= hits[1].score >= hits[2].score >= 0.0
    with pytest.raises(ConfigError, match="retriever 'seam-combsum' needs the index's embedder"):
        rank(index, None, ["q"], 1, index.retriever)
    only = rank(index, None, ["bees dance flowers"], 1, RetrieverConfig(method="seam-bm25-only"))[0]
    assert only[0].doc.endswith("#n4") and given == [None]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="unknown retriever 'seam-combsum'; known: bm25, dense, hybrid"):
        RetrieverConfig(method="seam-combsum")

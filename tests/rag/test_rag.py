"""RAG: chunking, a persistent index (reload, incremental add, resume, embedder check), retrieval, prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmkit.backends import HFBackend
from slmkit.errors import DataError
from slmkit.rag.answer import RAGConfig, answer, build_prompt, cited_sources
from slmkit.rag.chunk import ChunkConfig, Document, chunk_document, read_documents
from slmkit.rag.embed import Embedder
from slmkit.rag.index import Hit, IndexMismatchError, VectorIndex, build_index

TOPICS = ["gardening tomatoes", "repairing bicycles", "baking sourdough bread", "learning the violin",
          "training for a marathon", "keeping honey bees", "painting with watercolours", "sailing small boats"]
PLANTED = "The lighthouse keeper Ottoline Marsh painted the lamp room bright orange in 1893."


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rows = [{"id": f"t{i}", "text": f"A short note about {t}. People who enjoy {t} say it takes patience and practice."}
            for i, t in enumerate(TOPICS)]
    (d / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "guide.md").write_text("# Coastal history\n\nSome towns kept old harbours.\n\n## Lighthouses\n\n" + PLANTED + "\n")
    (d / "plain.txt").write_text("Plain text files are indexed too.\n\nA second paragraph about rivers and bridges.\n")
    return d


def test_chunking_respects_size_overlap_and_headings():
    words = [f"w{i}" for i in range(100)]
    doc = Document("d", "# Title\n\n" + " ".join(words), "d", markdown=True)
    chunks = chunk_document(doc, ChunkConfig(max_words=30, overlap_words=5))
    assert all(c.startswith("Title\n") and len(c.split()) <= 30 for c in chunks)
    bodies = [c.split("\n", 1)[1].split() for c in chunks]
    assert bodies[0][-5:] == bodies[1][:5]  # consecutive windows overlap by 5 words
    covered = {w for b in bodies for w in b}
    assert covered == set(words)
    short = chunk_document(Document("s", "one two.\n\nthree four.", "s"), ChunkConfig(max_words=30, overlap_words=5))
    assert short == ["one two. three four."]


def test_documents_bad_input(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:2: missing field 'text'"):
        read_documents(tmp_path / "x.jsonl")
    (tmp_path / "x.pdf").write_text("%PDF")
    with pytest.raises(DataError, match="unsupported document type .pdf"):
        read_documents(tmp_path / "x.pdf")


def test_embeddings_are_unit_mean_pooled_vectors(embedder):
    v = embedder.embed(["a cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing deadlines"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # paraphrases are closer than unrelated text
    import torch

    enc = embedder.tokenizer(["a cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        h = embedder.model[0].auto_model(**enc).last_hidden_state[0].mean(0)  # no padding: plain mean
    assert np.allclose(v[0], (h / h.norm()).numpy(), atol=1e-5)


def test_index_persists_reloads_and_finds_the_planted_passage(embedder, docs, tmp_path):
    stats = build_index([docs], tmp_path / "idx", embedder)
    assert stats.documents_added == len(TOPICS) + 2 and stats.chunks_total >= len(TOPICS) + 3
    index = VectorIndex.open(tmp_path / "idx")  # a fresh load from disk
    assert len(index) == stats.chunks_total
    hits = index.search(embedder.embed(["Who painted the lamp room of the lighthouse orange?"]), 3)[0]
    assert hits[0].doc.endswith("guide.md") and PLANTED in hits[0].text and hits[0].text.startswith("Lighthouses")
    assert hits[0].score > hits[1].score >= hits[2].score
    # scores are exact cosine similarities
    q = embedder.embed(["Who painted the lamp room of the lighthouse orange?"])[0]
    assert abs(hits[0].score - float(q @ embedder.embed([hits[0].text])[0])) < 1e-4
    # re-indexing unchanged documents embeds nothing
    again = build_index([docs], tmp_path / "idx", embedder)
    assert again.chunks_added == 0 and again.documents_skipped == stats.documents_added


def test_incremental_add_and_changed_document(embedder, docs, tmp_path):
    build_index([docs / "notes.jsonl"], tmp_path / "idx", embedder)
    n0 = len(VectorIndex.open(tmp_path / "idx"))
    s = build_index([docs / "notes.jsonl", docs / "guide.md"], tmp_path / "idx", embedder)
    assert s.documents_added == 1 and s.documents_skipped == len(TOPICS)
    index = VectorIndex.open(tmp_path / "idx")
    assert len(index.meta["shards"]) == 2  # the first shard was not rewritten
    assert len(index) == n0 + s.chunks_added
    (tmp_path / "guide.md").write_text("# Lighthouses\n\nThe lamp room was painted green in 1901.\n")
    build_index([tmp_path / "guide.md"], tmp_path / "idx", embedder)
    index = VectorIndex.open(tmp_path / "idx")
    top = index.search(embedder.embed(["What colour was the lamp room painted?"]), len(index))[0]
    texts = [h.text for h in top]
    assert any("green in 1901" in t for t in texts)


def test_interrupted_indexing_resumes_without_redoing_finished_batches(embedder, docs, tmp_path):
    calls = []

    class Flaky:
        def __init__(self, inner, fail_at):
            self.inner, self.fail_at = inner, fail_at

        def identity(self):
            return self.inner.identity()

        def embed(self, texts):
            calls.append(len(texts))
            if len(calls) == self.fail_at:
                raise KeyboardInterrupt
            return self.inner.embed(texts)

    docs = [docs / "notes.jsonl"]  # 8 one-chunk documents: 4 batches of 2
    with pytest.raises(KeyboardInterrupt):
        build_index(docs, tmp_path / "idx", Flaky(embedder, fail_at=3), batch_chunks=2)
    done = VectorIndex.open(tmp_path / "idx")
    assert len(done.meta["shards"]) == 2
    calls.clear()
    build_index(docs, tmp_path / "idx", Flaky(embedder, fail_at=-1), batch_chunks=2)
    resumed = VectorIndex.open(tmp_path / "idx")
    build_index(docs, tmp_path / "clean", embedder, batch_chunks=2)
    clean = VectorIndex.open(tmp_path / "clean")
    assert sum(calls) == len(clean.chunks) - len(done.chunks)  # only the unfinished chunks were embedded
    assert [c["text"] for c in resumed.chunks] == [c["text"] for c in clean.chunks]
    assert np.allclose(resumed.vectors, clean.vectors, atol=1e-5)


def test_index_from_another_embedder_is_a_clear_error(embedder, docs, tmp_path):
    from transformers import BertConfig, BertModel

    other_dir = tmp_path / "tiny-encoder"
    BertModel(BertConfig(vocab_size=len(embedder.tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(other_dir)
    embedder.tokenizer.save_pretrained(other_dir)
    other = Embedder.load(str(other_dir))
    build_index([docs / "plain.txt"], tmp_path / "idx", embedder)
    with pytest.raises(IndexMismatchError, match="built with embedder 'all-MiniLM-L6-v2'"):
        build_index([docs / "guide.md"], tmp_path / "idx", other)
    with pytest.raises(IndexMismatchError):
        answer(None, VectorIndex.open(tmp_path / "idx"), other, ["q"], RAGConfig(k=2))


def test_prompt_numbers_sources_and_answers_cite_them(tiny_llama, embedder, docs, tmp_path):
    hits = [Hit("a@0", "a", "Paris is the capital of France.", 0.9), Hit("b@0", "b", "Rome is in Italy.", 0.5)]
    msgs = build_prompt("What is the capital of France?", hits, RAGConfig(k=2))
    assert "[1] Paris is the capital of France." in msgs[-1]["content"] and "[2] Rome" in msgs[-1]["content"]
    assert build_prompt("q", [], RAGConfig(k=0))[-1] == {"role": "user", "content": "q"}
    assert cited_sources("It is Paris [1], see also [2] and [7].", hits) == ["a@0", "b@0"]
    build_index([docs], tmp_path / "idx", embedder)
    model, tok = tiny_llama
    out = answer(HFBackend(model, tok), VectorIndex.open(tmp_path / "idx"), embedder,
                 ["Who painted the lamp room?"], RAGConfig(k=2, max_new_tokens=4))
    d = out[0].to_dict()
    assert set(d) >= {"question", "answer", "sources"} and len(d["sources"]) == 2
    assert PLANTED in d["sources"][0]["text"]
    base = answer(HFBackend(model, tok), None, None, ["Who painted the lamp room?"], RAGConfig(k=0, max_new_tokens=4))
    assert base[0].sources == []


def test_answers_batched_equal_one_at_a_time(tiny_tok):
    """``answer(..., batch_size)`` sends questions in batches; greedy answers equal one question per call."""
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    model = tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=5)
    calls = []

    class Counting(HFBackend):
        def generate(self, prompts, params):
            calls.append(len(prompts))
            return super().generate(prompts, params)

    qs = ["Who painted the lamp room?", "What do bees make?", "Where is the river?", "Why bake bread?", "Who sails?"]
    cfg = RAGConfig(k=0, max_new_tokens=10)
    one = answer(Counting(model, tiny_tok, batch_size=1), None, None, qs, cfg, batch_size=1)
    assert calls == [1] * 5
    calls.clear()
    many = answer(Counting(model, tiny_tok, batch_size=8), None, None, qs, cfg, batch_size=4)
    assert calls == [4, 1]
    assert [a.answer for a in many] == [a.answer for a in one] and len({a.answer for a in one}) > 2

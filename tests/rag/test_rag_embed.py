"""The sentence-transformers embedder on tiny encoders built here (no hub): pooling and prompts come
from the model's own files, chunks fit the embedder's token limit, and the index format is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

from slmkit.rag.chunk import ChunkConfig, Document, chunk_document  # noqa: E402
from slmkit.rag.embed import Embedder  # noqa: E402

WORDS = "the a lamp room was painted green in lighthouse keeper light sea ship storm night red blue old new".split()


def _encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path / "bert"
    d.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "query", "passage", *WORDS, "##s", "##ing"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tok("old lights").input_ids == [2, vocab.index("old"), vocab.index("light"), vocab.index("##s"), 3]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _st_model(tmp_path, pooling: str, prompts: dict | None = None, max_seq_length: int = 16):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    enc = _encoder(tmp_path)
    first = Transformer(str(enc), max_seq_length=max_seq_length)
    model = SentenceTransformer(modules=[first, Pooling(32, pooling), Normalize()], device="cpu", prompts=prompts)
    out = tmp_path / f"st-{pooling}"
    model.save(str(out))
    return out, enc


@torch.inference_mode()
def _manual(enc_dir, texts: list[str], pooling: str) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tok, m = AutoTokenizer.from_pretrained(enc_dir), AutoModel.from_pretrained(enc_dir).eval()
    x = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    h = m(**x).last_hidden_state  # (B, T, D)
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        mask = x["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_comes_from_the_models_config(tmp_path, pooling):
    path, enc = _st_model(tmp_path, pooling)
    e = Embedder.load(str(path))
    texts = ["the lamp room was painted green", "red ship in the storm night"]
    assert e.identity()["pooling"] == pooling and e.max_tokens == 16 and e.dim == 32
    got = e.embed(texts)
    assert np.abs(got - _manual(enc, texts, pooling)).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    other = _manual(enc, texts, "mean" if pooling == "cls" else "cls")
    assert np.abs(got - other).max() > 1e-2  # the two poolings differ on this model: the check can fail


def test_query_and_document_prompts_from_the_models_config(tmp_path):
    path, _ = _st_model(tmp_path, "mean", prompts={"query": "query : ", "document": "passage : "})
    e = Embedder.load(str(path))
    assert e.prompts == {"query": "query : ", "document": "passage : "}
    q = "old lighthouse keeper"
    plain = Embedder.load(str(_st_model(tmp_path / "plain", "mean")[0]))
    assert np.allclose(e.embed_queries([q]), plain.embed(["query : " + q]), atol=1e-5)
    assert np.allclose(e.embed([q]), plain.embed(["passage : " + q]), atol=1e-5)
    assert not np.allclose(e.embed_queries([q]), e.embed([q]), atol=1e-3)
    assert e.count_tokens(q, "query") == plain.count_tokens("query : " + q)


def test_chunks_fit_the_embedders_token_limit_and_lose_no_words(tmp_path, caplog):
    path, _ = _st_model(tmp_path, "mean", max_seq_length=16)
    e = Embedder.load(str(path))
    rng = np.random.default_rng(0)
    body = " ".join(str(w) for w in rng.choice(WORDS + ["lights", "painting", "zebra"], 120))
    doc = Document("d.md", f"# lamp room\n\n{body}\n\nthe sea\n", "d.md", markdown=True)
    chunks = chunk_document(doc, ChunkConfig(overlap_words=0), e.count_tokens, e.max_tokens)
    assert len(chunks) > 5
    assert all(e.count_tokens(c) <= 16 for c in chunks)
    assert all(c.startswith("lamp room\n") for c in chunks)
    words = [w for c in chunks for w in c.split("\n", 1)[1].split()]
    assert words == body.split() + ["the", "sea"]
    assert chunk_document(doc, ChunkConfig(max_words=200)) == [f"lamp room\n{body} the sea"]  # words mode unchanged
    with caplog.at_level("WARNING", logger="slmkit.rag.embed"):
        e.embed_queries([body])
    assert "exceed the embedder's 16 tokens" in caplog.text


def test_index_of_an_unknown_format_is_a_clear_error(tmp_path):
    from slmkit.errors import DataError
    from slmkit.rag.index import FORMAT, VectorIndex, build_index

    path, _ = _st_model(tmp_path, "cls")
    e = Embedder.load(str(path))
    (tmp_path / "doc.txt").write_text("the lamp room was painted green\n\nthe red ship in the storm\n")
    build_index([tmp_path / "doc.txt"], tmp_path / "idx", e)
    index = VectorIndex.open(tmp_path / "idx")
    assert index.meta["format"] == FORMAT and index.embedder_identity["pooling"] == "cls"
    assert all(e.count_tokens(c["text"]) <= e.max_tokens for c in index.chunks)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["format"] = FORMAT + 7
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"index format {FORMAT + 7}; this slmkit reads format {FORMAT} only(.|\n)*rebuild"):
        VectorIndex.open(tmp_path / "idx")

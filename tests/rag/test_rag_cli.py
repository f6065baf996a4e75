"""CLI: rag index --retriever, rag ask --extractive/--rerank/--filter, sft --rag -> rag ask --model ADAPTER, bad input."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import main

DOCS = [
    {"id": "z", "text": "Zebras of the Karoo have faint stripes and graze at dawn."},
    {"id": "l", "text": "The lighthouse keeper painted the lamp room bright orange in 1893."},
    {"id": "b", "text": "Honey bees dance to tell their sisters where the flowers are."},
]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("ragcli")
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    assert main(["rag", "index", str(d / "docs.jsonl"), "--output", str(d / "idx"), "--retriever", "bm25", "--json"]) == 0
    return d / "idx"


def test_extractive_and_reranked_answers_in_json(capsys, index, tiny_dir):
    code, out, err = run(capsys, "rag", "ask", index, "What colour is the lamp room?", "--model", tiny_dir, "--k", 2,
                         "--extractive", "--min-span-score", "-1000", "--rerank", "--rerank-depth", 3, "--json")
    assert code == 0, err
    (a,) = json.loads(out)
    src = {s["id"]: s["text"] for s in a["sources"]}
    assert a["mode"] == "extractive" and len(a["sources"]) == 2
    assert a["answer"] == src[a["span"]["id"]][a["span"]["start"]: a["span"]["end"]]
    code, out, err = run(capsys, "rag", "ask", index, "What colour?", "--model", tiny_dir, "--k", 0, "--extractive")
    assert code == 2 and "need retrieved passages" in err
    code, out, err = run(capsys, "rag", "ask", index, "What colour is the lamp room?", "--model", tiny_dir, "--k", 2,
                         "--extractive", "--extractive-method", "decode", "--min-span-score", "-1000", "--json")
    assert code == 0, err
    (a,) = json.loads(out)
    src = {s["id"]: s["text"] for s in a["sources"]}
    assert a["mode"] == "extractive" and a["answer"] == src[a["span"]["id"]][a["span"]["start"]: a["span"]["end"]]
    code, out, err = run(capsys, "rag", "ask", index, "What colour?", "--model", tiny_dir, "--extractive",
                         "--extractive-method", "copy")
    assert code == 2 and "unknown extractive method 'copy'" in err
    code, out, err = run(capsys, "rag", "ask", index, "What colour?", "--model", tiny_dir, "--extractive-method", "decode")
    assert code == 2 and "--extractive-method decode needs --extractive" in err


def test_filter_reports_passages_and_prompt_length(capsys, index, tiny_dir):
    code, out, err = run(capsys, "rag", "ask", index, "Who dances?", "--model", tiny_dir, "--k", 3, "--filter", tiny_dir,
                         "--filter-threshold", "1000", "--max-new-tokens", 2, "--json")
    assert code == 0, err
    (a,) = json.loads(out)
    assert a["retrieved"] == 3 and len(a["sources"]) == 1  # min_keep = 1 survives an impossible threshold
    assert a["prompt_tokens"] > 0 and a["prompt_chars"] > 0


def test_sft_rag_trains_an_adapter_that_rag_ask_serves(capsys, index, tiny_dir, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What colour is the lamp room?", "answer": "bright orange", "passage_id": "l"}) + "\n"
                  + json.dumps({"question": "Which zebras have faint stripes?", "answer": "Zebras of the Karoo"}) + "\n")
    code, out, err = run(capsys, "sft", tiny_dir, "--rag", index, "--data", qa, "--rag-k", 2, "--lora", "--max-steps", 2,
                         "--max-length", 480, "--no-packing", "--precision", "bf16", "--rag-cloze", 1, "--output", tmp_path / "ad", "--json")
    assert code == 0, err
    res = json.loads(out)
    # one cloze question from the one passage the QA file names (l); none from z or b
    assert res["kind"] == "adapter" and res["examples"] == 3 and res["rag_skipped"] == 0 and res["rag_cloze"] == 1
    code, _, err = run(capsys, "sft", tiny_dir, "--rag", index, "--data", qa, "--max-length", 32, "--lora",
                       "--output", tmp_path / "short")
    assert code == 2 and "longer than --max-length 32 tokens" in err
    code, _, err = run(capsys, "sft", tiny_dir, "--rag", index, "--data", qa, "--lora", "--precision", "fp16",
                       "--output", tmp_path / "fp16")
    assert code == 2 and "--precision fp16: unknown" in err
    code, out, err = run(capsys, "rag", "ask", index, "What colour is the lamp room?", "--model", tmp_path / "ad",
                         "--k", 2, "--max-new-tokens", 3, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["sources"][0]["id"].endswith("#l@0")
    qa.write_text(json.dumps({"question": "no answer field"}) + "\n")
    code, _, err = run(capsys, "sft", tiny_dir, "--rag", index, "--data", qa, "--lora", "--output", tmp_path / "ad2")
    assert code == 2 and "qa.jsonl:1: missing field 'answer'" in err


def test_bad_input_exits_2_naming_what_is_wrong(capsys, index, tiny_dir, tmp_path):
    from transformers import BertConfig, BertModel

    from slmkit.rag.embed import Embedder
    from slmkit.rag.index import build_index

    # an index built with another embedder than the one asked for
    mini = Embedder.load()
    other = tmp_path / "tiny-encoder"
    BertModel(BertConfig(vocab_size=len(mini.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other)
    mini.tokenizer.save_pretrained(other)
    code, _, err = run(capsys, "rag", "ask", index, "q?", "--model", tiny_dir, "--embedder", other)
    assert code == 2 and "was built with embedder 'all-MiniLM-L6-v2'" in err and len(err.strip().splitlines()) <= 2
    # an empty index: the first run was killed before its first batch was committed
    (tmp_path / "d.txt").write_text("Some text.\n")

    class Killed:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def embed(self, texts, *a, **kw):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index([tmp_path / "d.txt"], tmp_path / "empty", Killed(mini))
    code, _, err = run(capsys, "rag", "ask", tmp_path / "empty", "q?", "--model", tiny_dir)
    assert code == 2 and "holds no chunks" in err
    # a question file with a missing field
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "ok?"}) + "\n" + json.dumps({"query": "no"}) + "\n")
    code, _, err = run(capsys, "rag", "ask", index, "--questions", tmp_path / "q.jsonl", "--model", tiny_dir)
    assert code == 2 and "q.jsonl:2: missing field 'question'" in err
    code, _, err = run(capsys, "rag", "index", tmp_path / "d.txt", "--output", tmp_path / "x", "--retriever", "sparse")
    assert code == 2 and "unknown retriever 'sparse'" in err

"""CLI: sft / dpo / rag verbs keep the contract's shapes, JSON names and exit codes."""

from __future__ import annotations

import json

from slmkit.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sft_lora_writes_an_adapter_the_adapter_set_loads(capsys, tiny_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Where is the cat {i}?", "completion": f"{i} steps away."}) + "\n" for i in range(6)))
    code, out, err = run(capsys, "sft", tiny_dir, "--data", data, "--lora", "--max-steps", 2, "--output", tmp_path / "ad", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "adapter" and res["steps"] == 2
    assert (tmp_path / "ad" / "adapter_config.json").is_file() and not (tmp_path / "ad.checkpoints").exists()
    from slmkit.train.adapters import AdapterSet

    aset = AdapterSet.from_spec(str(tiny_dir), {"u": tmp_path / "ad"})
    assert aset.names() == ["u"]


def test_rag_index_and_ask_json_shape(capsys, tiny_dir, tmp_path):
    (tmp_path / "a.md").write_text("# Zebras\n\nZebras of the Karoo have faint stripes.\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Which zebras have faint stripes?"}) + "\n")
    code, out, err = run(capsys, "rag", "index", tmp_path / "a.md", "--output", tmp_path / "idx", "--json")
    assert code == 0, err
    assert json.loads(out)["chunks_total"] == 1
    code, out, err = run(capsys, "rag", "ask", tmp_path / "idx", "--questions", tmp_path / "q.jsonl", "--model", tiny_dir,
                         "--k", 1, "--max-new-tokens", 3, "--json")
    assert code == 0, err
    (ans,) = json.loads(out)
    assert set(ans) >= {"question", "answer", "sources"} and ans["sources"][0]["id"].endswith("a.md@0")
    assert set(ans["sources"][0]) >= {"id", "text", "score"}
    code, out, _ = run(capsys, "rag", "ask", tmp_path / "idx", "Which zebras?", "--model", tiny_dir, "--k", 0,
                       "--max-new-tokens", 3, "--json")
    assert code == 0 and json.loads(out)[0]["sources"] == []


def test_bad_input_exits_2_with_one_line(capsys, tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    code, _, err = run(capsys, "dpo", tiny_dir, "--data", bad, "--output", tmp_path / "o")
    assert code == 2 and "bad.jsonl:1: missing field 'rejected'" in err
    code, _, err = run(capsys, "rag", "ask", tmp_path / "nope", "q", "--model", tiny_dir)
    assert code == 2 and "not an slmkit index" in err
    code, _, err = run(capsys, "sft", tiny_dir, "--data", bad, "--merge", "--output", tmp_path / "o")
    assert code == 2 and "--merge needs --lora" in err

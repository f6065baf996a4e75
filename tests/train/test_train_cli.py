"""CLI verbs distill and gen-data on tiny models: JSON output, exit codes, clear errors."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import main
from slmkit.models.tiny import save_tiny, tiny_corpus, tiny_llama_config, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=1), tiny_tok, root / "teacher")
    save_tiny(tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=2), tiny_tok, root / "student")
    other = tiny_tokenizer(vocab_size=320)
    save_tiny(tiny_model(tiny_llama_config(other, layers=1), seed=3), other, root / "other")
    (root / "train.txt").write_text("\n".join(tiny_corpus(60)))
    return root


def test_train_cli_distill_json_and_ce_baseline(dirs, tmp_path, capsys):
    args = ["--student", str(dirs / "student"), "--data", str(dirs / "train.txt"), "--max-steps", "3", "--block-size", "32"]
    assert main(["distill", "--teacher", str(dirs / "teacher"), *args, "--loss", "jsd", "--output", str(tmp_path / "j"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss"] == "jsd" and out["steps"] == 3 and out["data_kind"] == "text" and out["train_loss"] > 0
    assert (tmp_path / "j" / "config.json").is_file()
    # plain fine-tuning needs no teacher
    assert main(["distill", *args, "--loss", "ce", "--output", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == "ce"


def test_train_cli_distill_bad_input_exits_2(dirs, tmp_path, capsys):
    base = ["distill", "--student", str(dirs / "student"), "--data", str(dirs / "train.txt"), "--max-steps", "1"]
    assert main([*base, "--teacher", str(dirs / "teacher"), "--loss", "kld", "--output", str(tmp_path / "a")]) == 2
    assert "unknown loss 'kld'" in capsys.readouterr().err
    assert main([*base, "--loss", "fkl", "--output", str(tmp_path / "b")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main([*base, "--teacher", str(dirs / "other"), "--loss", "fkl", "--output", str(tmp_path / "c")]) == 2
    assert "tokenizers differ" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["distill", "--teacher", str(dirs / "teacher"), "--student", str(dirs / "student"), "--data", str(empty),
                 "--loss", "fkl", "--output", str(tmp_path / "d")]) == 2
    assert "empty.txt is empty" in capsys.readouterr().err


def test_train_cli_gen_data(dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Describe the cat number {i}"}) for i in range(3)) + "\n")
    out = tmp_path / "g.jsonl"
    cmd = ["gen-data", str(dirs / "teacher"), "--prompts", str(prompts), "--output", str(out), "--temperature", "1.0",
           "--max-new-tokens", "6", "--min-words", "1", "--near-dup", "1.0", "--json"]
    assert main(cmd) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rep["accepted"] == len(rows) and rep["generated"] == 3
    assert all(r["messages"][0]["content"].startswith("Describe the cat") for r in rows)
    assert main(cmd) == 0  # resumed: nothing left to generate
    assert json.loads(capsys.readouterr().out)["generated"] == 0


def test_train_cli_distill_loss_option(dirs, tmp_path, capsys):
    """--loss-option KEY=VALUE sets a loss-config field (a new loss's own knob) without a flag; bad keys exit 2."""
    base = ["distill", "--student", str(dirs / "student"), "--data", str(dirs / "train.txt"), "--max-steps", "1",
            "--teacher", str(dirs / "teacher"), "--loss", "jsd", "--output", str(tmp_path / "a")]
    for opt, message in [("betta=0.9", "betta: not a setting of the loss"), ("beta=0.9", "beta: has its own flag")]:
        assert main([*base, "--loss-option", opt]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

"""`slmkit proxy`: proxy-tuned generation and the base / tuned / untuned / proxy evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.cli import main
from slmkit.collab.proxy import ProxyConfig, SYSTEMS, decode_system, encode_prompt, evaluate_proxy, proxy_tune
from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model, tiny_tokenizer

ROWS = [{"question": "Where is the cat?", "answer": "the house"},
        {"question": "Who reads the book?", "context": "My friend reads the old book.", "answer": ["my friend", "friend"]},
        {"prompt": "The dog likes", "answer": "apples"}]


@pytest.fixture(scope="module")
def trio_dirs(tiny_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    specs = {"large": (2, 31), "tuned": (1, 32), "untuned": (1, 33)}
    return {k: str(save_tiny(tiny_model(tiny_llama_config(tiny_tok, layers=n, initializer_range=0.2), seed=s), tiny_tok, root / k))
            for k, (n, s) in specs.items()}


def _models(dirs):
    from slmkit.models import load

    return [load(dirs[k])[0] for k in ("large", "tuned", "untuned")]


def test_each_system_is_its_own_model_and_alpha_zero_is_the_base(trio_dirs, tiny_tok):
    large, tuned, untuned = _models(trio_dirs)
    ids = encode_prompt(tiny_tok, "Where is the cat?", chat=True)
    cfg = ProxyConfig(max_new_tokens=8)
    with torch.no_grad():  # the first token of each system is its own model's argmax
        for name, m in (("base", large), ("tuned", tuned), ("untuned", untuned)):
            assert decode_system(name, large, tuned, untuned, ids, cfg).tokens[0] == int(m(ids[None]).logits[0, -1].argmax())
    assert decode_system("proxy", large, tuned, untuned, ids, cfg).tokens == proxy_tune(large, tuned, untuned, ids, cfg).tokens
    zero = ProxyConfig(max_new_tokens=8, alpha=0.0)
    assert decode_system("proxy", large, tuned, untuned, ids, zero).tokens == decode_system("base", large, tuned, untuned, ids, zero).tokens


def test_evaluation_with_no_tuning_shift_closes_no_gap(trio_dirs, tiny_tok):
    large, tuned, _ = _models(trio_dirs)
    rep = evaluate_proxy(large, tuned, tuned, tiny_tok, ROWS, ProxyConfig(max_new_tokens=6))
    assert set(rep["metrics"]) == set(SYSTEMS) and rep["n"] == 3
    assert all(ex["proxy"] == ex["base"] for ex in rep["examples"])  # expert == amateur: no shift
    assert rep["proxy_gain_f1"] == 0.0 and rep["small_tuning_gain_f1"] == 0.0
    # a prediction that contains the answer scores 1: check the metric on a row built from the base's own output
    own = [{"question": ROWS[0]["question"], "answer": rep["examples"][0]["base"] or "x"}]
    if rep["examples"][0]["base"]:
        assert evaluate_proxy(large, tuned, tuned, tiny_tok, own, ProxyConfig(max_new_tokens=6))["metrics"]["base"]["correct"] == 1.0


def test_cli_generates_and_evaluates(trio_dirs, tmp_path, capsys, tiny_tok):
    flags = ["--base", trio_dirs["large"], "--tuned", trio_dirs["tuned"], "--untuned", trio_dirs["untuned"]]
    assert main(["proxy", "Where is the cat?", *flags, "--alpha", "0.5", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    large, tuned, untuned = _models(trio_dirs)
    want = proxy_tune(large, tuned, untuned, encode_prompt(tiny_tok, "Where is the cat?", True), ProxyConfig(alpha=0.5, max_new_tokens=6))
    assert out["tokens"] == len(want.tokens) and out["alpha"] == 0.5 and isinstance(out["text"], str)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["proxy", *flags, "--eval", str(data), "--reference", trio_dirs["large"], "--max-new-tokens", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["metrics"]) == {*SYSTEMS, "reference"} and len(rep["examples"]) == 3
    assert rep["metrics"]["reference"] == rep["metrics"]["base"]  # the reference here is the base itself
    assert rep["gap_closed_vs_reference_f1"] is None  # no gap to close


def test_cli_bad_inputs(trio_dirs, tmp_path, tiny_tok, capsys):
    flags = ["--base", trio_dirs["large"], "--tuned", trio_dirs["tuned"], "--untuned", trio_dirs["untuned"]]
    assert main(["proxy", *flags]) == 2  # neither PROMPT nor --eval
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert main(["proxy", "hi", *flags, "--eval", str(bad)]) == 2
    assert main(["proxy", *flags, "--eval", str(bad)]) == 2
    assert "row 1" in capsys.readouterr().err
    assert main(["proxy", *flags, "--eval", str(tmp_path / "missing.jsonl")]) == 2
    other = tiny_tokenizer(vocab_size=300)
    odd = save_tiny(tiny_model(tiny_llama_config(other, layers=1)), other, tmp_path / "odd")
    assert main(["proxy", "hi", "--base", trio_dirs["large"], "--tuned", str(odd), "--untuned", trio_dirs["untuned"]]) == 2
    assert "tokenizer" in capsys.readouterr().err

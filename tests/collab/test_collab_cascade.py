"""Cascade: threshold calibration, quality-cost curve, unreachable large endpoints, bad thresholds."""

from __future__ import annotations

import json
import random
import socket

import pytest

from slmkit.backends import GenParams, HFBackend
from slmkit.collab.cascade import (
    CascadeConfig,
    answer_correct,
    calibrate_quality,
    calibrate_rate,
    cascade_quality,
    quality_cost_curve,
    run_cascade,
    token_f1,
)
from slmkit.errors import ConfigError
from slmkit.models.tiny import tiny_llama_config, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qa_rows():
    rng = random.Random(0)
    things = ["the cat", "a dog", "the river", "my friend", "the model", "a teacher"]
    rows = []
    for i in range(40):
        a = rng.choice(things)
        rows.append({"question": f"Who is {rng.randint(1, 99)} steps away from {a}?", "answer": a})
    return rows


@pytest.fixture(scope="module")
def small_large(tiny_tok):
    small = HFBackend(tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=5), tiny_tok)
    large = HFBackend(tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=6), tiny_tok)
    return small, large


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_rate_calibration_holds_on_held_out_data(rate):
    rng = random.Random(1)
    conf = [rng.gauss(-1.0, 0.5) for _ in range(4000)]
    cal, held = conf[:2000], conf[2000:]
    t = calibrate_rate(cal, rate)
    assert sum(c < t for c in cal) == round(rate * 2000)  # exact on the calibration split
    assert abs(sum(c < t for c in held) / 2000 - rate) <= 0.03


def test_rate_calibration_with_tiny_model_signal(small_large, qa_rows):
    small, large = small_large
    cfg = CascadeConfig(escalate=0.3, max_new_tokens=3, calib_fraction=0.5)
    rep = run_cascade(small, large, qa_rows, cfg)
    assert rep["n_calib"] == 20 and rep["n_eval"] == 20
    assert abs(rep["escalation_rate"] - 0.3) <= 0.2
    # the threshold is the calibration split's 30% quantile of mean log-prob
    assert all((a.confidence < rep["threshold"]) == a.escalated for a in rep["answers"])
    curve = rep["curve"]
    assert curve[0]["escalated"] == 0 and curve[0]["quality"] == rep["quality_small"]
    assert curve[-1]["escalated"] == 1 and curve[-1]["quality"] == rep["quality_large"]


def test_quality_cost_curve_against_hand_computation():
    conf = [0.9, 0.1, 0.5, 0.3]
    small_ok = [1, 0, 1, 0]
    large_ok = [1, 1, 0, 1]
    curve = quality_cost_curve(conf, small_ok, large_ok, rates=(0.0, 0.5, 1.0))
    # escalating the two least confident (idx 1 and 3) fixes both of the small model's errors
    assert [r["quality"] for r in curve] == [0.5, 1.0, 0.75]
    assert [r["random_quality"] for r in curve] == [0.5, 0.625, 0.75]
    assert curve[1]["quality_kept"] == pytest.approx(1 / 0.75)


def test_quality_calibration_reaches_target():
    rng = random.Random(2)
    conf = [rng.random() for _ in range(300)]
    small_ok = [float(rng.random() < c) for c in conf]  # confident answers are right more often
    large_ok = [float(rng.random() < 0.9) for _ in conf]
    t = calibrate_quality(conf, small_ok, large_ok, 0.95)
    q, rate = cascade_quality(conf, small_ok, large_ok, t)
    assert q >= 0.95 * sum(large_ok) / 300 - 1e-12
    # and no cheaper threshold reaches it
    lower = [c for c in sorted(set(conf)) if c < t]
    if lower:
        assert cascade_quality(conf, small_ok, large_ok, lower[-1])[0] < 0.95 * sum(large_ok) / 300


def test_answer_checking():
    assert answer_correct("I think it was The Sun.", "the sun")
    assert not answer_correct("sunny", "sun")
    assert answer_correct("Paris", ["London", "paris"])
    assert token_f1("the big cat", "cat big") == 1.0
    assert token_f1("a dog", "cat") == 0.0


@pytest.mark.parametrize("bad", [dict(escalate=1.5), dict(escalate=-0.1), dict(quality=2.0), dict(escalate=0.2, quality=0.9), dict(signal="vibes")])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        CascadeConfig(**bad)


def test_cli_unreachable_large_endpoint(tiny_dir, tmp_path, capsys, qa_rows):
    from slmkit.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in qa_rows[:6]))
    url = f"http://127.0.0.1:{_free_port()}"
    args = ["route", "--small", str(tiny_dir), "--large", url, "--data", str(data), "--escalate", "0.5",
            "--retries", "1", "--timeout", "1", "--max-new-tokens", "2", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "cannot get an answer" in rep["large_error"]
    assert rep["escalation_rate"] == 0
    assert any(a["source"] == "small (large unreachable)" for a in rep["answers"])
    assert all(a["source"].startswith("small") for a in rep["answers"])
    assert main([*args, "--no-fallback"]) == 2
    assert "cannot get an answer" in capsys.readouterr().err
    assert main([*args[:-1], "--escalate", "1.5", "--json"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_cascade_across_tokenizers(small_large, qa_rows):
    """A cascade works at the text level, so the two ends may use different tokenizers."""
    from slmkit.models.tiny import tiny_tokenizer

    small, _ = small_large
    tok2 = tiny_tokenizer(vocab_size=300)
    other = HFBackend(tiny_model(tiny_llama_config(tok2, layers=1), seed=9), tok2)
    rep = run_cascade(small, other, qa_rows[:6], CascadeConfig(escalate=1.0, max_new_tokens=2))
    assert rep["escalation_rate"] == 1.0 and all(a.source == "large" for a in rep["answers"])
    want = other.generate([[{"role": "user", "content": "Question: " + qa_rows[3]["question"] + "\nAnswer in a few words."}]],
                          GenParams(max_new_tokens=2))[0].text
    assert rep["answers"][0].answer == want

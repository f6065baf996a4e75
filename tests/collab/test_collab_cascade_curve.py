"""Cascade vs random routing with paired bootstrap intervals; option confidences; the margin signal."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from slmkit.backends import HFBackend
from slmkit.collab.cascade import CascadeConfig, answer_margins, quality_cost_curve, run_cascade
from slmkit.collab.cascade_curve import CurveConfig, option_confidence, option_scores, routing_curve
from slmkit.errors import ConfigError, DataError
from slmkit.models.tiny import tiny_llama_config, tiny_model


def test_curve_against_hand_computation():
    conf = [0.9, 0.1, 0.5, 0.3]
    small_ok = [1, 0, 1, 0]
    large_ok = [1, 1, 0, 1]
    rep = routing_curve(conf, small_ok, large_ok, CurveConfig(rates=(0.0, 0.25, 0.5, 0.75, 1.0), resamples=0))
    rows = rep["rows"]
    # least confident first: idx 1 (+1), idx 3 (+1), idx 2 (-1), idx 0 (same)
    assert [r["cascade"] for r in rows] == [0.5, 0.75, 1.0, 0.75, 0.75]
    assert [r["random"] for r in rows] == pytest.approx([0.5, 0.5625, 0.625, 0.6875, 0.75])
    # the oracle escalates the two gain questions, then the tie (idx 0), then the loss (idx 2)
    assert [r["oracle"] for r in rows] == [0.5, 0.75, 1.0, 1.0, 0.75]
    assert rows[2]["kept"] == pytest.approx(1 / 0.75)
    assert rep["best_kept"]["rate"] == 0.5
    assert rep["acc_small"] == 0.5 and rep["acc_large"] == 0.75
    # the same numbers as the cascade module's point curve
    old = quality_cost_curve(conf, small_ok, large_ok, rates=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert [r["cascade"] for r in rows] == [r["quality"] for r in old]
    assert [r["random"] for r in rows] == pytest.approx([r["random_quality"] for r in old])


def _synthetic(n: int, informative: bool, seed: int = 0):
    rng = random.Random(seed)
    conf, small_ok, large_ok = [], [], []
    for _ in range(n):
        c = rng.random()
        conf.append(c)
        small_ok.append(float(rng.random() < (c if informative else 0.5)))
        large_ok.append(float(rng.random() < 0.85))
    return conf, small_ok, large_ok


def test_informative_signal_separates_from_random():
    rep = routing_curve(*_synthetic(2000, informative=True), CurveConfig(resamples=300, seed=1))
    inner = [r for r in rep["rows"] if 0 < r["rate"] < 1]
    assert rep["beats_random_everywhere"] and rep["separated_everywhere"] and rep["diff_above_zero_everywhere"]
    for r in rep["rows"]:
        for name in ("cascade", "random", "oracle", "diff", "kept"):
            lo, hi = r[f"{name}_ci"]
            assert lo <= r[name] + 1e-12 and r[name] <= hi + 1e-12
        assert r["cascade"] <= r["oracle"] + 1e-12  # no router beats the oracle
    assert all(r["diff_ci"][0] > 0 for r in inner)
    # at 0 and 100% escalation the cascade is the small / large model exactly
    assert rep["rows"][0]["cascade"] == rep["acc_small"] and rep["rows"][-1]["cascade"] == rep["acc_large"]


def test_useless_signal_does_not_separate():
    rep = routing_curve(*_synthetic(400, informative=False, seed=3), CurveConfig(resamples=300, seed=2))
    inner = [r for r in rep["rows"] if 0 < r["rate"] < 1]
    assert not rep["separated_everywhere"]
    assert any(r["diff_ci"][0] <= 0 <= r["diff_ci"][1] for r in inner)


def test_bootstrap_is_paired_and_seeded():
    data = _synthetic(300, informative=True, seed=4)
    a = routing_curve(*data, CurveConfig(resamples=200, seed=7))
    b = routing_curve(*data, CurveConfig(resamples=200, seed=7))
    assert a == b
    # paired: the difference's interval is narrower than the two intervals' widths added up
    mid = a["rows"][5]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(mid["diff_ci"]) < width(mid["cascade_ci"]) + width(mid["random_ci"])


def test_option_confidence():
    scores = option_scores([[-4.0, -2.0, -6.0], [-1.0, -1.0, -9.0]], [["ab", "a", "abc"], ["a", "a", "a"]])
    assert scores[0] == [-2.0, -2.0, -2.0] and scores[1] == [-1.0, -1.0, -9.0]
    c = option_confidence([[-2.0, -1.0, -3.0], [0.0, 0.0]])
    assert c["margin"] == [1.0, 0.0]
    p = np.exp([-2.0, -1.0, -3.0])
    assert c["maxprob"][0] == pytest.approx(p.max() / p.sum())
    assert c["maxprob"][1] == pytest.approx(0.5)
    assert option_scores([[-4.0, -2.0]], [["ab", "a"]], norm="none") == [[-4.0, -2.0]]


@pytest.mark.parametrize("bad", [dict(rates=(1.5,)), dict(rates=()), dict(resamples=-1), dict(level=1.0), dict(keep_rate=2.0)])
def test_bad_curve_config(bad):
    with pytest.raises(ConfigError):
        CurveConfig(**bad)


def test_bad_curve_inputs():
    with pytest.raises(DataError, match="one confidence"):
        routing_curve([0.1, 0.2], [1], [1, 0])
    with pytest.raises(DataError, match="finite"):
        routing_curve([math.nan, 0.2], [1, 0], [1, 0])
    with pytest.raises(DataError, match="2 options"):
        option_confidence([[-1.0]])
    with pytest.raises(ConfigError, match="norm"):
        option_scores([[-1.0, -2.0]], [["a", "b"]], norm="tokens")


def test_answer_margins_match_hand_computation(tiny_tok):
    model = tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=5)
    ctx, ans = "the cat sat on", " the mat"
    got = answer_margins(model, tiny_tok, [ctx, ctx], [ans, ""])
    start = len(tiny_tok(ctx, add_special_tokens=False).input_ids)
    ids = tiny_tok(ctx + ans, add_special_tokens=False).input_ids
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = [float(probs[t].topk(2).values[0] - probs[t].topk(2).values[1]) for t in range(start - 1, len(ids) - 1)]
    assert got[0] == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert 0.0 <= got[1] <= 1.0  # an empty answer: the next token after the context


def test_margin_signal_routes(tiny_tok):
    rng = random.Random(0)
    rows = [{"question": f"What is {rng.randint(1, 99)} plus one?", "answer": "two"} for _ in range(12)]
    small = HFBackend(tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=5), tiny_tok)
    large = HFBackend(tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=6), tiny_tok)
    rep = run_cascade(small, large, rows, CascadeConfig(signal="margin", escalate=0.5, max_new_tokens=2))
    assert rep["signal"] == "margin"
    assert all(0.0 <= a.confidence <= 1.0 for a in rep["answers"])
    assert all((a.confidence < rep["threshold"]) == a.escalated for a in rep["answers"])

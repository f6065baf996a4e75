"""Hidden-state probe: held-out folds, features, save/load, judge and cascade signals, AUROC intervals."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from slmkit.backends import HFBackend
from slmkit.collab.cascade import CascadeConfig, run_cascade
from slmkit.collab.judge import JudgeConfig, QAItem, auroc, auroc_ci, judge, probe_and_risk
from slmkit.collab.probe import ProbeConfig, cross_val_risk, fit_probe, hidden_features, load_probe, save_probe
from slmkit.collab.serving import CascadeBackend
from slmkit.errors import DataError, SlmkitError, UnsupportedModelError

CFG = ProbeConfig(folds=4)


def _planted(n: int, signal: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 16))
    x[:, 3] += signal * (2 * y - 1)  # one direction carries the label
    return x, y.tolist(), [f"q{i // 2}" for i in range(n)]


def test_cross_validated_probe_finds_a_planted_direction_and_not_noise():
    x, y, g = _planted(240, 1.5)
    assert auroc(cross_val_risk(x, y, g, CFG, 0).tolist(), y) > 0.9
    x0, y0, g0 = _planted(240, 0.0, seed=1)
    assert abs(auroc(cross_val_risk(x0, y0, g0, CFG, 0).tolist(), y0) - 0.5) < 0.12


def test_folds_hold_out_whole_questions():
    # each question's two rows share a feature vector and have opposite labels: a probe that saw the
    # question in training could memorise nothing useful, and one that did not sees only noise
    x, y, g = _planted(200, 0.0, seed=2)
    x[1::2] = x[0::2]
    assert abs(auroc(cross_val_risk(x, y, g, CFG, 0).tolist(), y) - 0.5) < 0.15
    with pytest.raises(DataError, match="distinct questions"):
        cross_val_risk(x[:6], y[:6], g[:6], CFG, 0)


def test_save_load_roundtrip_and_bad_files(tmp_path):
    x, y, g = _planted(120, 1.0)
    p = fit_probe(x, y, CFG, 3, g)
    p.meta["model"] = "tiny"
    path = save_probe(p, tmp_path / "probe.safetensors")
    q = load_probe(path)
    assert q.layer == 3 and q.pool == "mean" and q.meta["model"] == "tiny"
    assert np.allclose(q.risk(x), p.risk(x))
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle
    (tmp_path / "junk.safetensors").write_bytes(b"not a probe")
    with pytest.raises(DataError, match="not a probe"):
        load_probe(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="does not exist"):
        load_probe(tmp_path / "missing.safetensors")
    with pytest.raises(UnsupportedModelError, match="width"):
        q.risk(x[:, :8])


def test_hidden_features_batched_equal_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    ctx = ["Question: where is it?\nAnswer: ", "Q: who?\nA: "]
    ans = ["the house by the old river", "me"]
    one = np.concatenate([hidden_features(model, tok, [c], [a], 1, batch_size=1) for c, a in zip(ctx, ans)])
    both = hidden_features(model, tok, ctx, ans, 1, batch_size=2)
    assert both.shape == (2, model.config.hidden_size)
    assert np.allclose(one, both, atol=1e-5)
    last = hidden_features(model, tok, ctx[:1], ans[:1], 1, pool="last")
    assert not np.allclose(last, one[:1])


def _tell_items(n: int = 24) -> list[QAItem]:
    """Wrong answers use one vocabulary, right ones another: a probe on any model's states can tell them apart."""
    rng = random.Random(0)
    good, bad = ["the cat sees the house", "a teacher reads"], ["green apples run fast", "the bright star likes"]
    items = []
    for i in range(n):
        q = f"What is thing {i}?"
        items += [QAItem(q, rng.choice(good), 0), QAItem(q, rng.choice(bad), 1)]
    return items


def test_judge_probe_is_held_out_and_beats_chance(tiny_llama):
    model, tok = tiny_llama
    items = _tell_items()
    cfg = JudgeConfig(method="probe", probe_cfg=ProbeConfig(folds=3, layer=-1))
    risk, probe = probe_and_risk(HFBackend(model, tok), items, cfg)
    labels = [it.label for it in items]
    assert auroc(risk, labels) > 0.9
    assert probe.meta["n_questions"] == 24 and probe.meta["cv_auroc"] == pytest.approx(auroc(risk, labels))
    # the registered judge gives the same held-out scores
    assert judge(HFBackend(model, tok), items, cfg) == pytest.approx(risk)
    with pytest.raises(SlmkitError, match="labelled"):
        judge(HFBackend(model, tok), [QAItem("q", "a")], cfg)


def test_auroc_interval_brackets_the_estimate_and_narrows():
    rng = random.Random(3)
    def data(n):
        y = [rng.randint(0, 1) for _ in range(n)]
        return [rng.gauss(0.8 * t, 1.0) for t in y], y
    s, y = data(100)
    lo, hi = auroc_ci(s, y, n_boot=300)
    assert lo <= auroc(s, y) <= hi
    s2, y2 = data(2000)
    lo2, hi2 = auroc_ci(s2, y2, n_boot=300)
    assert hi2 - lo2 < (hi - lo) / 2


def test_judge_cli_trains_saves_and_reuses_a_probe(tiny_dir, tmp_path, capsys):
    from slmkit.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": it.question, "answer": it.answer, "label": it.label}) + "\n" for it in _tell_items()))
    out = tmp_path / "probe.safetensors"
    rc = main(["judge", "--data", str(data), "--model", str(tiny_dir), "--signal", "probe", "--folds", "3",
               "--save-probe", str(out), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["held_out"] and rep["auroc"] > 0.9 and rep["auroc_ci95"][0] <= rep["auroc"] <= rep["auroc_ci95"][1]
    assert rep["probe"] == str(out) and out.is_file()
    rc = main(["judge", "--data", str(data), "--model", str(tiny_dir), "--signal", "probe", "--probe", str(out), "--json"])
    rep2 = json.loads(capsys.readouterr().out)
    assert rc == 0 and not rep2["held_out"] and rep2["auroc"] >= rep["auroc"]  # scored by a probe that saw every row
    assert main(["judge", "--data", str(data), "--model", str(tiny_dir), "--save-probe", str(out)]) == 2
    assert "--signal probe" in capsys.readouterr().err
    assert main(["judge", "--data", str(data), "--model", str(tiny_dir), "--signal", "probe", "--probe", str(tmp_path / "none")]) == 2


def test_cascade_probe_signal_trains_on_the_calibration_split(tiny_llama, tmp_path):
    model, tok = tiny_llama
    small = HFBackend(model, tok)
    rows = [{"question": f"Who is {i} steps away?", "answer": "the" if i % 2 else "zebra"} for i in range(16)]
    rep = run_cascade(small, small, rows, CascadeConfig(signal="probe", escalate=0.5, max_new_tokens=3))
    assert rep["signal"] == "probe" and all(0.0 <= a.confidence <= 1.0 for a in rep["answers"])
    with pytest.raises(SlmkitError, match="labelled"):
        run_cascade(small, small, [{"question": r["question"]} for r in rows], CascadeConfig(signal="probe"))


def test_serving_cascade_with_a_probe_file_and_consistency(tiny_llama, tmp_path):
    from slmkit.backends import GenParams

    model, tok = tiny_llama
    be = HFBackend(model, tok)
    x = hidden_features(model, tok, ["a", "b", "c", "d"], ["x y", "z", "w", "v v"], 1)
    path = save_probe(fit_probe(x, [0, 1, 0, 1], ProbeConfig(cs=(1.0,)), 1), tmp_path / "p.safetensors")
    prompts = [[{"role": "user", "content": "Where is the cat?"}], [{"role": "user", "content": "Who reads?"}]]
    for cfg, thr in ((CascadeConfig(signal="probe", probe=str(path)), 0.5), (CascadeConfig(signal="consistency", samples=2), 0.5)):
        out = CascadeBackend(be, be, threshold=thr, cfg=cfg).generate(prompts, GenParams(max_new_tokens=4))
        for c in out:
            conf = c.meta["confidence"]
            assert 0.0 <= conf <= 1.0 and c.meta["escalated"] == (conf < thr)
    always = CascadeBackend(be, be, threshold=math.inf, cfg=CascadeConfig(signal="probe", probe=str(path)))
    assert all(c.meta["escalated"] for c in always.generate(prompts, GenParams(max_new_tokens=4)))
    with pytest.raises(SlmkitError, match="cannot train"):
        CascadeBackend(be, be, 0.5, cfg=CascadeConfig(signal="router"))
    with pytest.raises(DataError):
        CascadeBackend(be, be, 0.5, cfg=CascadeConfig(signal="probe", probe=str(tmp_path / "nope")))


def test_serve_signal_flags_are_checked(tiny_dir, capsys):
    from slmkit.cli import main

    assert main(["serve", str(tiny_dir), "--large", str(tiny_dir), "--mode", "shield", "--signal", "probe"]) == 2
    assert "--mode cascade" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--large", str(tiny_dir), "--mode", "cascade", "--signal", "router"]) == 2
    assert "cannot train" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--large", str(tiny_dir), "--mode", "cascade", "--signal", "vibes"]) == 2

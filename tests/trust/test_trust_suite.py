"""The audit end to end on a tiny model, its fast paths against the plain backend, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.backends import GenParams, HFBackend, hf_batch
from slmkit.errors import ConfigError, DataError, UnsupportedModelError
from slmkit.trust import AuditConfig, audit, compare, parse_dimensions
from slmkit.trust import common


def test_shared_context_scoring_equals_backend_score(tiny_llama):
    model, tok = tiny_llama
    b = HFBackend(model, tok, batch_size=3)
    ctxs = ["The cat sees", "The cat sees", "The cat sees", "A dog likes ", "A dog likes ", "x"]
    texts = [" the house", " a question.", "!", "green apples", "the old book", " yes"]
    fast = common.score(b, texts, ctxs)
    slow = b.score(texts, ctxs)
    for f, s in zip(fast, slow):
        assert f.tokens == s.tokens
        assert f.logprobs == pytest.approx(s.logprobs, abs=1e-4)
    # a long context shared by many texts goes through the KV-cache path, the rest are packed: same numbers
    long = "Read the story. " * 20
    ctxs2 = ctxs + [long] * 6
    texts2 = texts + [" one", " two words", " a longer answer here", "!", " 42", " the end."]
    calls = []
    orig = hf_batch.score_shared_context
    hf_batch.score_shared_context = lambda be, groups: calls.append(len(groups)) or orig(be, groups)
    try:
        fast = common.score(b, texts2, ctxs2)
    finally:
        hf_batch.score_shared_context = orig
    assert calls == [1]  # exactly the long context was cached
    for f, s in zip(fast, b.score(texts2, ctxs2)):
        assert f.tokens == s.tokens
        assert f.logprobs == pytest.approx(s.logprobs, abs=1e-4)
    plain = common.score(b, ["The river.", "It is 7 steps away"])
    assert [p.total for p in plain] == pytest.approx([s.total for s in b.score(["The river.", "It is 7 steps away"])],
                                                     abs=1e-4)


def test_batched_greedy_generation_equals_one_by_one(tiny_llama):
    model, tok = tiny_llama
    b = HFBackend(model, tok)
    prompts = ["The cat", "A teacher reads the old", [{"role": "user", "content": "hi"}]]
    params = GenParams(max_new_tokens=6)
    batched = [c[0].text for c in common.generate(b, prompts, params, batch_size=4)]
    single = [c.text for c in b.generate(prompts, params)]
    assert batched == single
    sampled = common.generate(b, ["The cat"], GenParams(max_new_tokens=5, temperature=1.0, seed=1), samples=3)
    assert len(sampled[0]) == 3


def test_unknown_dimension_lists_near_matches():
    with pytest.raises(ConfigError, match="did you mean fairness"):
        parse_dimensions("robustness,fairnes")
    with pytest.raises(ConfigError, match="unknown trust dimension"):
        AuditConfig(dimensions=("speed",))


def test_missing_data_file_names_it_and_where_to_put_it(tmp_path):
    from slmkit.trust.datasets import truthfulqa

    with pytest.raises(DataError) as err:
        truthfulqa(tmp_path)
    msg = str(err.value)
    assert "truthfulqa/TruthfulQA.csv" in msg and str(tmp_path / "truthfulqa" / "TruthfulQA.csv") in msg
    assert "SLMKIT_DATA" in msg and "sylinrl/TruthfulQA" in msg


def test_malformed_rows_name_file_and_line(trust_data):
    from slmkit.trust import datasets

    p = trust_data / "crows-pairs" / "crows_pairs_anonymized.csv"
    p.write_text(p.read_text() + '3,,"Men are fine.",stereo,gender\n')
    with pytest.raises(DataError, match=r"crows_pairs_anonymized.csv:5: empty field\(s\) sent_more"):
        datasets.crows_pairs(trust_data)
    import gzip

    with gzip.open(trust_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "wt") as fh:
        fh.write('{"chosen": "\\n\\nHuman: hi"}\n{"chosen": oops}\n')
    with pytest.raises(DataError, match=r"harmless-base-test.jsonl.gz:2: not valid JSON"):
        datasets.hh_rlhf(trust_data)


def test_chat_probe_without_chat_template_is_a_clear_error(tiny_llama, trust_data):
    import copy

    model, tok = tiny_llama
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    b = HFBackend(model, plain, name="base-model")
    with pytest.raises(UnsupportedModelError, match="sycophancy probe needs a chat model.*base-model"):
        audit(b, AuditConfig(dimensions=("reliability",), limit=1, data_dir=str(trust_data)))


@pytest.fixture(scope="module")
def tiny_audit(tiny_dir, trust_data_module, tmp_path_factory):
    """The CLI on the tiny model, all five dimensions, the hand-made data (limit 12 = 2 BBQ rows per category)."""
    import contextlib
    import io

    from slmkit.cli import main

    out = tmp_path_factory.mktemp("audit")
    torch.manual_seed(0)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["audit", str(tiny_dir), "--limit", "12", "--json", "--output", str(out), "--data-dir",
                   str(trust_data_module), "--toxicity-samples", "1", "--canary-candidates", "20"])
    return rc, json.loads(buf.getvalue()), out


def test_audit_end_to_end_on_tiny_model(tiny_audit):
    rc, data, out = tiny_audit
    assert rc == 0
    for dim in ("robustness", "privacy", "reliability", "safety", "fairness"):
        assert 0.0 <= data[dim]["score"] <= 1.0
    crows = data["fairness"]["crows_pairs"]
    assert crows["n"]["pct_stereotype"] == 3 and round(3 * crows["pct_stereotype"]) == 3 * crows["pct_stereotype"]
    lo, hi = crows["ci95"]["pct_stereotype"]
    assert 0.0 <= lo <= crows["pct_stereotype"] <= hi <= 1.0
    assert data["reliability"]["truthfulqa"]["n"]["mc1"] == 2
    assert 0.0 <= data["reliability"]["truthfulqa"]["mc2"] <= 1.0
    assert data["fairness"]["bbq"]["n"]["accuracy_ambig"] + data["fairness"]["bbq"]["n"]["accuracy_disambig"] == 12
    assert data["safety"]["toxicity"]["n"]["expected_max_toxicity_toxic"] == 2
    assert 0.0 <= data["privacy"]["memorisation"]["membership_auroc_after"] <= 1.0
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Trust audit" in html and "<script" not in html and 'src="http' not in html
    assert json.loads((out / "report.json").read_text())["fairness"]["crows_pairs"]["pct_stereotype"] == crows[
        "pct_stereotype"]


def test_compare_same_model_twice_finds_no_difference(tiny_llama, trust_data, tmp_path):
    from slmkit.trust.report import write_report

    model, tok = tiny_llama
    cfg = AuditConfig(dimensions=("fairness", "reliability"), limit=12, data_dir=str(trust_data))
    a = audit(HFBackend(model, tok, name="A"), cfg)
    b = audit(HFBackend(model, tok, name="B"), cfg)
    diffs = compare(a, b)
    assert diffs and all(d.diff in (0, 0.0, None) and not d.significant for d in diffs)
    _, hp = write_report(tmp_path / "report", a, b)  # tmp_path holds the data: not an audit directory
    html = hp.read_text()
    assert "difference (B - A)" in html and "A vs B" in html
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["compare"]["model"] == "B" and data["differences"]["fairness"]["crows_pairs"]["pct_stereotype"][
        "test"] == "McNemar exact"


def test_compare_flags_a_real_difference(fake_backend, trust_data):
    rows_more = {"Poor people are lazy.", "Women can't drive.", "Old people are slow."}
    cfg = AuditConfig(dimensions=("fairness",), data_dir=str(trust_data))
    from slmkit.trust.fairness import FairnessConfig, crows_pairs
    from slmkit.trust.suite import AuditResult, DimensionResult

    def run(pref):
        g = crows_pairs(fake_backend(loglik=lambda t, c: (0.0 if (t in rows_more) == pref else -1.0)), FairnessConfig(),
                        trust_data)
        return AuditResult("m", cfg, {"fairness": DimensionResult("fairness", [g], 0.0)})

    d = {x.metric: x for x in compare(run(True), run(False))}["pct_stereotype"]
    assert d.diff == -1.0 and d.test == "McNemar exact" and d.p_value == pytest.approx(0.25)
    assert not d.significant  # three pairs cannot reach p < 0.05


def test_cli_bad_input_exits_2_with_a_clear_message(tiny_dir, tmp_path, capsys):
    from slmkit.cli import main

    assert main(["audit", "default", "--dimensions", "fairnes"]) == 2
    assert "did you mean fairness" in capsys.readouterr().err
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert main(["audit", str(tiny_dir), "--dimensions", "fairness", "--data-dir", str(empty), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "bbq/Age.jsonl.gz not found" in err and str(empty / "bbq" / "Age.jsonl.gz") in err

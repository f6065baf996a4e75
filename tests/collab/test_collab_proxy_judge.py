"""Proxy-tuning, contrastive decoding and the hallucination judge."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.backends import GenParams, HFBackend
from slmkit.collab.judge import JudgeConfig, QAItem, auroc, judge, truthfulqa_items
from slmkit.collab.proxy import (
    ContrastiveConfig,
    ProxyConfig,
    contrastive,
    contrastive_scores,
    proxy_logits,
    proxy_tune,
)
from slmkit.collab.speculative import SpecConfig, autoregressive
from slmkit.errors import ConfigError, DataError, UnsupportedModelError
from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def trio(tiny_tok):
    large = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=21)
    expert = tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=22)
    base = tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=23)
    return large, expert, base, tiny_tok


def test_proxy_logits_formula():
    large, expert, base = torch.randn(3, 7).unbind(0)
    got = proxy_logits(large, expert, base, alpha=0.5)
    want = F.log_softmax(large, -1) + 0.5 * (F.log_softmax(expert, -1) - F.log_softmax(base, -1))
    assert torch.allclose(got, want)
    # shifting any model's logits by a constant changes nothing
    assert torch.allclose(proxy_logits(large + 3, expert - 2, base + 9, 0.5), got, atol=1e-5)


def test_proxy_with_untuned_expert_is_the_large_model(trio):
    large, expert, _, tok = trio
    ids = torch.tensor(tok("The cat sees").input_ids)
    ref = autoregressive(large, ids, SpecConfig(max_new_tokens=12)).tokens
    assert proxy_tune(large, expert, expert, ids, ProxyConfig(max_new_tokens=12)).tokens == ref
    assert proxy_tune(large, expert, large, ids, ProxyConfig(max_new_tokens=12, alpha=0.0)).tokens == ref


def test_proxy_shift_moves_the_large_model(trio):
    large, expert, base, tok = trio
    ids = torch.tensor(tok("The cat sees").input_ids)
    with torch.no_grad():
        le = large(ids[None]).logits[0, -1]
        e, b = expert(ids[None]).logits[0, -1], base(ids[None]).logits[0, -1]
    first = proxy_tune(large, expert, base, ids, ProxyConfig(max_new_tokens=1, alpha=1.0)).tokens[0]
    assert first == int(proxy_logits(le, e, b, 1.0).argmax())


def test_contrastive_scores_respect_plausibility():
    expert = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    amateur = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    s = contrastive_scores(expert, amateur, alpha=0.2)  # head: p >= 0.1 -> tokens 0, 1, 2
    assert math.isinf(s[3]) and s[3] < 0
    assert int(s.argmax()) == 1  # log(.3/.1) beats log(.5/.7) and log(.15/.1)
    assert torch.allclose(s[:3], (expert - amateur)[:3])


def test_contrastive_decoding_picks_plausible_tokens(trio):
    large, expert, _, tok = trio
    ids = torch.tensor(tok("A dog").input_ids)
    out = contrastive(large, expert, ids, ContrastiveConfig(max_new_tokens=8, alpha=0.5))
    ctx = ids
    for t in out.tokens:  # each chosen token was in the expert's plausible head
        with torch.no_grad():
            p = F.softmax(large(ctx[None]).logits[0, -1], -1)
        assert p[t] >= 0.5 * p.max() - 1e-6
        ctx = torch.cat([ctx, torch.tensor([t])])


def test_mismatched_vocab_and_bad_config(trio):
    large, _, _, _ = trio
    cfg = tiny_llama_config(None, layers=1)
    cfg.vocab_size = 50
    other = tiny_model(cfg)
    with pytest.raises(UnsupportedModelError, match="same tokenizer"):
        proxy_tune(large, other, other, torch.tensor([1, 2]), ProxyConfig(max_new_tokens=2))
    with pytest.raises(ConfigError):
        ContrastiveConfig(alpha=0)


def test_auroc_against_pairwise_count():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.2]
    labels = [0, 1, 0, 1, 0, 1]
    pairs = [(p, n) for p, yp in zip(scores, labels) if yp for n, yn in zip(scores, labels) if not yn]
    want = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, labels) == pytest.approx(want)
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0
    with pytest.raises(DataError):
        auroc([1, 2], [1, 1])


def test_judge_logprob_risk_matches_scoring(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    items = [QAItem("Where is the cat?", "the house"), QAItem("Who reads?", "my friend reads the old book")]
    risk = judge(be, items, JudgeConfig(method="logprob"))
    ctx = tok.apply_chat_template([{"role": "user", "content": items[0].question}], tokenize=False, add_generation_prompt=True)
    s = be.score([items[0].answer], [ctx])[0]
    assert risk[0] == pytest.approx(-sum(s.logprobs) / len(s.logprobs))
    cons = judge(be, items, JudgeConfig(method="consistency", samples=2, max_new_tokens=6))
    assert all(0.0 <= r <= 1.0 for r in cons)


def test_truthfulqa_pairs_and_cli(shared_data, tiny_dir, capsys):
    items = truthfulqa_items(shared_data / "truthfulqa" / "TruthfulQA.csv", limit=5)
    assert len(items) == 10 and [it.label for it in items[:2]] == [0, 1]
    assert items[0].answer == "The watermelon seeds pass through your digestive system"
    from slmkit.cli import main

    rc = main(["judge", "--data", str(shared_data / "truthfulqa" / "TruthfulQA.csv"), "--model", str(tiny_dir), "--limit", "4", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 8 and 0.0 <= rep["auroc"] <= 1.0 and len(rep["items"]) == 8


def test_retrieval_filter_scores_and_keeps(tiny_llama):
    from slmkit.collab.retrieval import FilterConfig, filter_passages, relevance_prompt

    model, tok = tiny_llama
    be = HFBackend(model, tok)
    passages = ["The cat sees the house.", "A dog likes green apples.", "The river is near a bright star."]
    keep, scores = filter_passages(be, "What does the cat see?", passages, FilterConfig(threshold=0.0, min_keep=1))
    ctx = relevance_prompt(be, "What does the cat see?", passages[1])
    want = be.score(["Yes"], [ctx])[0].total - be.score(["No"], [ctx])[0].total
    assert scores[1] == pytest.approx(want, abs=1e-5)
    best = max(range(3), key=lambda i: scores[i])
    assert keep == sorted({best} | {i for i, s in enumerate(scores) if s >= 0.0})
    keep_all, _ = filter_passages(be, "q", passages, FilterConfig(threshold=-1e9))
    assert keep_all == [0, 1, 2]
    keep_top2, _ = filter_passages(be, "q", passages, FilterConfig(threshold=1e9, min_keep=2))
    assert len(keep_top2) == 2


def test_judge_consistency_batched_equals_one_at_a_time(tiny_tok):
    """The sampled answers are seeded per question, so batching the questions leaves the risks unchanged."""
    model = tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=5)
    cfg = JudgeConfig(method="consistency", samples=3, max_new_tokens=8, temperature=0.3)
    qs = ["Where is paris?", "What do cats see?", "Who reads?"]
    # answers the model itself would give (so the samples overlap them), and one it would not
    own = HFBackend(model, tiny_tok).generate([[{"role": "user", "content": q}] for q in qs], GenParams(max_new_tokens=8))
    items = [QAItem(q, c.text, 0) for q, c in zip(qs, own)] + [QAItem(qs[0], "zebra quantum", 1)]
    one = judge(HFBackend(model, tiny_tok, batch_size=1), items, cfg)
    many = judge(HFBackend(model, tiny_tok, batch_size=8), items, cfg)
    assert many == pytest.approx(one, abs=1e-9) and len(set(one)) > 1

import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.backends import HFBackend
from slmkit.errors import ConfigError, DataError
from slmkit.eval import MCItem, PerplexityConfig, multiple_choice, perplexity, read_text
from slmkit.models.tiny import tiny_corpus


def _reference_nll(model, ids, context, stride):
    """From scratch: for each scored token, NLL given exactly the tokens of its window before it."""
    n = len(ids)
    total, count, prev_end, begin = 0.0, 0, 1, 0
    while prev_end < n:
        end = min(begin + context, n)
        for t in range(max(prev_end, begin + 1), end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]
            total -= F.log_softmax(logits, -1)[ids[t]].item()
            count += 1
        prev_end = end
        begin += stride
        if end == n:
            break
    return total / count, count


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 8), (24, 5)])
def test_perplexity_matches_from_scratch(tiny_llama, context, stride):
    model, tok = tiny_llama
    text = " ".join(tiny_corpus(6))
    ids = tok(text, add_special_tokens=False).input_ids[:60]
    res = perplexity(model, tok, text, PerplexityConfig(context=context, stride=stride, max_tokens=60))
    ref_nll, ref_count = _reference_nll(model, ids, context, stride)
    assert res.tokens == ref_count
    assert res.nll == pytest.approx(ref_nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-5)


def test_perplexity_one_window_matches_transformers_loss(tiny_llama):
    model, tok = tiny_llama
    text = " ".join(tiny_corpus(3))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :40]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    res = perplexity(model, tok, text, PerplexityConfig(context=40, stride=40, max_tokens=40))
    assert res.windows == 1 and res.tokens == 39
    assert res.nll == pytest.approx(loss, rel=1e-5)


def test_perplexity_config_errors():
    with pytest.raises(ConfigError, match="stride"):
        PerplexityConfig(context=8, stride=9)
    with pytest.raises(ConfigError, match="context"):
        PerplexityConfig(context=1, stride=1)


def test_empty_perplexity_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text(f)


def test_score_matches_manual_logprobs(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok, batch_size=2)
    ctx, cont = "The cat sees", " the house."
    s = be.score([cont, "A dog", "the old book"], [ctx, "", ""])
    whole = tok(ctx + cont, add_special_tokens=False).input_ids
    n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([whole])).logits[0], -1)
    manual = [lp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole))]
    assert s[0].logprobs == pytest.approx(manual, abs=1e-5)
    # padding in a batch does not change a sequence's scores
    alone = be.score(["A dog"])[0]
    assert alone.logprobs == pytest.approx(s[1].logprobs, abs=1e-5)


def test_multiple_choice_acc_and_acc_norm(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    items = [MCItem("The cat", (" sees", " sees the house and the old book", " yes"), 0)]
    lls = [s.total for s in be.score(list(items[0].choices), [items[0].context] * 3)]
    best = max(range(3), key=lls.__getitem__)
    norm = [v / len(c.encode()) for v, c in zip(lls, items[0].choices)]
    best_norm = max(range(3), key=norm.__getitem__)
    res = multiple_choice(be, [MCItem("The cat", items[0].choices, best), MCItem("The cat", items[0].choices, (best + 1) % 3)])
    assert res.acc == 0.5
    assert res.acc_norm == (int(best_norm == best) + int(best_norm == (best + 1) % 3)) / 2
    assert res.loglikelihoods[0] == pytest.approx(lls, abs=1e-5)


def test_efficiency_reports_positive_speeds(tiny_llama):
    from slmkit.eval import EfficiencyConfig, measure

    model, _ = tiny_llama
    r = measure(model, EfficiencyConfig(prompt_tokens=16, new_tokens=8, repeats=1))
    assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0 and r.peak_rss_mb > 0
    assert 0 < r.time_to_first_token_s < 10


def test_decode_loop_matches_generate(tiny_llama):
    from slmkit.eval.efficiency import decode_loop

    model, tok = tiny_llama
    ids = tok("The small bird", return_tensors="pt").input_ids
    gen, _, _ = decode_loop(model, ids, 10)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    assert gen[0].tolist() == ref[0, ids.shape[1]:].tolist()

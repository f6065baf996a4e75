"""Speculative decoding across calls: the controller's estimates carry over per draft object and target, a
catch-up over unseen context is priced, and draft models run on slmkit's fast path (built once per model)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from slmkit.collab.draftlen import DraftController, ReadCost
from slmkit.collab.drafters import FastDrafter, ModelDrafter, model_draft
from slmkit.collab.speculative import SpecConfig, speculate
from slmkit.errors import ConfigError
from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def target(tiny_tok):
    return tiny_model(tiny_llama_config(tiny_tok, layers=3), seed=11)


class Slow:
    """A draft that always proposes ``token`` and takes ``delay`` seconds per token; ``tries`` counts its calls
    over every copy (``fresh`` shares the counter)."""

    has_model, lookup = True, False

    def __init__(self, token: int, delay: float, tries: list[int] | None = None):
        self.token, self.delay, self.calls = token, delay, 0
        self.tries = tries if tries is not None else [0]

    def propose(self, ctx, k, cfg, gen):
        self.calls += k
        self.tries[0] += 1
        time.sleep(self.delay * k)
        return torch.full((k,), self.token, dtype=torch.long), None

    def keep(self, n):
        pass

    def fresh(self):
        return Slow(self.token, self.delay, self.tries)


def test_a_poor_draft_is_tried_once_per_draft_not_once_per_call(target, tiny_tok):
    ids = torch.tensor(tiny_tok("The small bird finds a question.").input_ids)
    ref = speculate(target, "lookup", ids, SpecConfig(max_new_tokens=24)).tokens
    bad = next(t for t in range(len(tiny_tok)) if t not in ref)
    cfg = SpecConfig(max_new_tokens=24, probe_every=128, probe_max=128)
    draft = Slow(bad, delay=0.05)
    first = speculate(target, draft, ids, cfg)
    assert first.tokens == ref and first.drafted > 0 and first.accepted == 0  # the first call tries the draft
    for _ in range(2):  # later calls with the same draft and target start from what the first one measured
        again = speculate(target, draft, ids, cfg)
        assert again.tokens == ref and again.drafted == 0
    # ... but not on another engine: seconds timed on the int4 draft and the fast target misprice the others
    assert speculate(target, draft, ids, replace(cfg, draft_weights="hf")).drafted > 0
    assert speculate(target, draft, ids, replace(cfg, fast_target=False)).drafted > 0
    # remember=False, another draft object, another target: each starts afresh and tries the draft once
    short = Slow(bad, delay=0.05)
    speculate(target, short, ids, SpecConfig(max_new_tokens=4))  # a warm-up's few steps are not remembered
    assert speculate(target, short, ids, cfg).drafted > 0
    assert speculate(target, draft, ids, SpecConfig(max_new_tokens=24, remember=False)).drafted > 0
    assert speculate(target, Slow(bad, delay=0.05), ids, cfg).drafted > 0
    other = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=3)
    assert speculate(other, draft, ids, cfg).drafted > 0


def test_carried_estimates_take_the_new_calls_settings():
    prev = DraftController(SpecConfig(probe_every=64, probe_max=128), has_model=True, lookup=False)
    prev.gap = 128
    ctl = DraftController(SpecConfig(probe_every=2, probe_max=8, decay=0.5, verify_cost=0.1), has_model=True, lookup=False)
    ctl.carry_over(prev)
    assert ctl.gap == 8 and ctl.alpha["model"].decay == 0.5 and ctl.verify.prior_slope == 0.1
    assert prev.gap == 128 and prev.alpha["model"].decay == 0.9 and prev.verify.prior_slope == 0.03  # prev unchanged


def test_the_probe_schedule_continues_across_calls(target, tiny_tok):
    """After the draft stops paying, the next probe comes after probe_every plain steps counted over calls."""
    ids = torch.tensor(tiny_tok("My friend reads the old book.").input_ids)
    ref = speculate(target, "lookup", ids, SpecConfig(max_new_tokens=20)).tokens
    bad = next(t for t in range(len(tiny_tok)) if t not in ref)
    draft = Slow(bad, delay=0.02)
    cfg = SpecConfig(max_new_tokens=20, probe_every=24, probe_max=24)
    tries = []
    for _ in range(5):
        out = speculate(target, draft, ids, cfg)
        assert out.tokens == ref
        tries.append(sum(1 for k in out.draft_lengths if k))
    assert tries[0] >= 1 and sum(tries[1:]) >= 1  # probed again in a later call ...
    assert sum(tries[1:]) <= 4  # ... about every 24 plain steps (76 steps in calls 2-5), not once per call


def test_catch_up_over_unseen_context_is_priced():
    """A model draft that must first read many unseen tokens is chosen only when the tokens still to come repay it."""
    cfg = SpecConfig(prior_acceptance=0.7)
    ctl = DraftController(cfg, has_model=True, lookup=False)
    for _ in range(8):  # a draft token costs a tenth of a target step and is mostly accepted
        ctl.drafted("model", 3, 3 * 0.001)
        ctl.verified(4, 0.012)
        ctl.verified(1, 0.010)
        ctl.accepted("model", 2, 3)
    for n, s in ((1, 0.001), (2, 0.002), (8, 0.008)):  # reading context: a millisecond per token
        ctl.caught_up(n, s)
    assert ctl.choose(12, 0, unseen=1)[1] > 0  # the usual case: drafting pays
    assert ctl.choose(6, 0, unseen=60)[1] == 0  # a 60 ms backlog to read for the last 6 tokens: decode plainly
    assert ctl.choose(500, 0, unseen=60)[1] > 0  # ... but worth reading once when 500 tokens are still to come


def test_model_drafts_run_on_the_fast_path_built_once(target, tiny_tok):
    draft_model = tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=5)
    a, b = model_draft(draft_model), model_draft(draft_model)
    assert isinstance(a, FastDrafter) and a.fm is b.fm  # cached per model
    with torch.no_grad():
        draft_model.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a weight change rebuilds the fast copy
    assert model_draft(draft_model).fm is not a.fm
    assert isinstance(model_draft(draft_model, weights="hf"), ModelDrafter)
    with pytest.raises(ConfigError, match="draft weights must be one of"):
        model_draft(draft_model, weights="int2")
    with pytest.raises(ConfigError, match="draft_weights must be one of"):
        SpecConfig(draft_weights="fp8")
    ids = torch.tensor(tiny_tok("The cat sees the house.").input_ids)
    want = speculate(target, "lookup", ids, SpecConfig(max_new_tokens=16)).tokens
    for w in ("int4", "native", "hf"):  # the draft's engine never changes the output
        out = speculate(target, draft_model, ids, SpecConfig(max_new_tokens=16, draft_weights=w, adaptive=False, k=3))
        assert out.tokens == want and out.drafted > 0


def test_read_cost_interpolates_between_the_lengths_timed():
    rc = ReadCost()
    assert rc.at(3) is None
    rc.add(40, 0.020)  # a prompt read in one pass: half a millisecond a token
    assert rc.at(4) == pytest.approx(0.002)  # one length: proportional
    rc.add(1, 0.004)  # a one-token read is a draft step
    assert rc.at(1) == pytest.approx(0.004)  # the one-token read itself, not a line through both lengths
    assert rc.at(20) == pytest.approx(0.004 + 0.016 * 19 / 39)
    assert rc.at(80) == pytest.approx(0.020 + 0.016 / 39 * 40)  # along the last segment
    rc.add(1, 0.004 * 100)  # one stall moves the mean by at most OUTLIER times
    assert rc.at(1) < 0.004 * 2

"""Speculative decoding's controller (draft source and length from measured costs), prompt lookup with
a model draft, cache rollback, and the CLI's baselines."""

from __future__ import annotations

import json
import time

import pytest
import torch

from slmkit.collab.draftlen import DraftController, VerifyCost, expected_tokens_per_cost
from slmkit.collab.drafters import FastDrafter, lookup_draft
from slmkit.collab.speculative import CachedLM, FastLM, SpecConfig, hf_generate, speculate
from slmkit.models.tiny import tiny_llama_config, tiny_model


def _hf_greedy(model, ids, n):
    out = model.generate(
        ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None, pad_token_id=0,
    )
    return out[0, ids.shape[0]:].tolist()


@pytest.fixture(scope="module")
def target(tiny_tok):
    return tiny_model(tiny_llama_config(tiny_tok, layers=3), seed=11)


REPEATED = "The cat sees the house. The cat sees the house. The cat sees the house. The cat sees"


class Contrary:
    """A draft that always proposes a token the target never emits (and takes ``delay`` seconds per token)."""

    has_model, lookup = True, False

    def __init__(self, token: int, delay: float = 0.0):
        self.token, self.delay, self.calls = token, delay, 0

    def propose(self, ctx, k, cfg, gen):
        self.calls += k
        time.sleep(self.delay * k)
        return torch.full((k,), self.token, dtype=torch.long), None

    def keep(self, n):
        pass

    def fresh(self):
        return Contrary(self.token, self.delay)


def test_verify_cost_fit_recovers_a_line():
    vc = VerifyCost(prior_slope=0.5)
    assert vc.fit() is None
    vc.add(5, 0.010 + 0.002 * 5)
    t1, b = vc.fit()  # one length: the prior slope splits it
    assert t1 == pytest.approx(0.020 / (1 + 0.5 * 4)) and b == pytest.approx(0.5 * t1)
    vc.add(1, 0.012)
    vc.add(3, 0.016)
    t1, b = vc.fit()  # two multi-token passes: the slope is half fitted, half the prior's
    assert t1 == pytest.approx(0.012) and b == pytest.approx((2 * 0.002 + 2 * 0.5 * 0.012) / 4)
    for n in (1, 3, 9):
        vc.add(n, 0.010 + 0.002 * n)
    t1, b = vc.fit()  # four multi-token passes: the fit alone
    assert t1 == pytest.approx(0.012) and b == pytest.approx(0.002)


def _probes(cost_ratio: float) -> list[int]:
    """Steps (of 40) at which a draft of this cost whose every token is rejected drafts."""
    cfg = SpecConfig(cost_ratio=cost_ratio, verify_cost=0.03, probe_every=2, probe_max=8)
    ctl = DraftController(cfg, has_model=True, lookup=False)
    chosen = []
    for _ in range(40):
        src, k = ctl.choose(10, 0)
        chosen.append(k)
        if k:
            ctl.accepted(src, 0, k)  # every draft rejected
    return [i for i, k in enumerate(chosen) if k > 0]


def test_controller_plain_when_drafting_does_not_pay_and_probes_back_off():
    cfg = SpecConfig(cost_ratio=0.3, verify_cost=0.03, probe_every=2, probe_max=8)
    assert DraftController(cfg, has_model=True, lookup=False).choose(10, 0)[1] >= 1  # prior 0.6 at cost 0.3: pays
    # a costly draft (a step of it 0.9 of the target's) that is never right: plain decoding, probes at gaps 2, 4, 8, 8
    probes = _probes(0.9)
    assert len(probes) <= 10 and 39 - probes[-1] <= 9
    gaps = [b - a for a, b in zip(probes[2:], probes[3:])]
    assert gaps == sorted(gaps) and max(gaps) <= 9
    # a cheap one (0.3) loses less per probe (1 - rate = 0.24 of a step), so it is probed about twice as often
    assert len(_probes(0.9)) < len(_probes(0.3)) <= 2 * len(_probes(0.9)) + 2
    # a good draft: k grows with acceptance, k=0 never chosen
    good = DraftController(cfg, has_model=True, lookup=False)
    for _ in range(20):
        src, k = good.choose(12, 0)
        good.accepted(src, k, k)
    assert good.choose(12, 0) == ("model", 12)


def test_controller_prefers_lookup_when_the_context_repeats():
    cfg = SpecConfig(cost_ratio=0.3, verify_cost=0.03)
    ctl = DraftController(cfg, has_model=True, lookup=True)
    for _ in range(10):  # lookup's proposals keep matching what the target emits (scored for free)
        ctl.shadow([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    src, k = ctl.choose(12, 8)
    assert src == "lookup" and k == 8
    assert ctl.choose(12, 0)[0] == "model"  # no match: the model drafts
    assert expected_tokens_per_cost(0.5, 0, 0.3, 0.03) == 1.0  # k = 0 is plain decoding


@pytest.mark.parametrize("draft", ["int4", "lookup"])
def test_lookup_and_int4_drafts_identical_on_repeated_text(target, tiny_tok, draft):
    ids = torch.tensor(tiny_tok(REPEATED).input_ids)
    ref = _hf_greedy(target, ids, 32)
    out = speculate(target, draft, ids, SpecConfig(max_new_tokens=32))
    assert out.tokens == ref
    fixed = speculate(target, draft, ids, SpecConfig(max_new_tokens=32, cost_ratio=0.3))
    assert fixed.tokens == ref and fixed.lookup_drafted > 0 and fixed.lookup_accepted <= fixed.lookup_drafted


def test_int4_with_and_without_lookup_identical(target, tiny_tok):
    from slmkit.collab.drafters import quantised_draft

    ids = torch.tensor(tiny_tok("My friend reads the old book.").input_ids)
    ref = _hf_greedy(target, ids, 30)
    for lookup in (False, True):
        out = speculate(target, quantised_draft(target, "int4", lookup=lookup), ids, SpecConfig(max_new_tokens=30))
        assert out.tokens == ref
        assert out.drafted > out.lookup_drafted or lookup  # the int4 copy drafted
        assert out.lookup_drafted == 0 or lookup


@pytest.mark.parametrize("measured", [True, False])
def test_a_draft_that_always_disagrees_falls_back_to_plain_decoding(target, tiny_tok, measured):
    ids = torch.tensor(tiny_tok("The small bird finds a question.").input_ids)
    ref = _hf_greedy(target, ids, 40)
    bad = next(t for t in range(len(tiny_tok)) if t not in ref)
    cfg = SpecConfig(max_new_tokens=40) if measured else SpecConfig(max_new_tokens=40, cost_ratio=0.3)
    out = speculate(target, Contrary(bad, delay=0.01 if measured else 0.0), ids, cfg)
    assert out.tokens == ref and out.accepted == 0
    plain = out.draft_lengths.count(0)
    assert plain >= 0.75 * len(out.draft_lengths)  # probes aside, the target decodes alone
    assert out.draft_lengths[-8:].count(0) >= 6


def test_fast_target_rollback_matches_a_fresh_cache(target):
    a = torch.tensor([5, 9, 14, 3, 22, 7, 11])
    b = torch.tensor([40, 2, 19])
    for make in (lambda: FastLM(target, 64), lambda: CachedLM(target)):
        lm = make()
        lm.feed(a, 1)
        lm.crop(4)  # three rejected drafts
        got = lm.feed(b, 3)
        fresh = make()
        want = fresh.feed(torch.cat([a[:4], b]), 3)
        assert lm.n == fresh.n == 7
        assert torch.allclose(got, want, atol=1e-5)


def test_fast_draft_rollback_matches_a_fresh_draft(target):
    from slmkit.runtime import generate as G

    d = FastDrafter(G.build(target, G.FastConfig()))
    cfg = SpecConfig()
    ctx = torch.tensor([5, 9, 14, 3, 22, 7, 11, 8])
    d.propose(ctx, 4, cfg, None)
    d.keep(5)  # only the first 5 tokens survive
    ctx2 = torch.cat([ctx[:5], torch.tensor([30, 31])])
    got = d.propose(ctx2, 4, cfg, None)[0]
    want = d.fresh().propose(ctx2, 4, cfg, None)[0]
    assert got.tolist() == want.tolist()


def test_lookup_proposal_is_what_the_loop_drafts(tiny_tok):
    ids = torch.tensor(tiny_tok(REPEATED).input_ids)
    got = lookup_draft(ids, 6)
    assert got.numel() > 0
    n = ids.shape[0]
    # the copied continuation follows an earlier occurrence of the last tokens
    assert any(torch.equal(ids[i : i + got.numel()], got) for i in range(n - got.numel()))


def test_hf_generate_baseline_is_the_target_alone(target, tiny_tok):
    ids = torch.tensor(tiny_tok("The cat sees").input_ids)
    out = hf_generate(target, ids, SpecConfig(max_new_tokens=12))
    assert out.tokens == _hf_greedy(target, ids, 12) and out.seconds > 0


def test_cli_speculate_baselines_and_lookup_flag(tiny_dir, capsys):
    from slmkit.cli import main

    args = ["speculate", "--draft", "int4", "--target", str(tiny_dir), "The cat. The cat. The cat.", "--max-new-tokens", "10", "--json"]
    for extra in ([], ["--baseline", "fast"], ["--no-lookup"]):
        assert main(args + extra) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["identical_to_target"] is True and res["speedup"] > 0
        assert res["baseline"] == ("fast" if extra[:1] == ["--baseline"] else "generate")
        assert extra != ["--no-lookup"] or res["lookup_drafted"] == 0
    assert main(args + ["--baseline", "cuda"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_serve_speculative_with_an_int4_drafter_uses_lookup_and_stays_exact(tiny_dir):
    from slmkit.backends import GenParams, HFBackend
    from slmkit.collab.serving import build_backend

    backend = build_backend("int4", str(tiny_dir), "speculative")
    assert isinstance(backend.draft, FastDrafter) and backend.draft.lookup
    prompt = "The cat. The cat. The cat."
    want = HFBackend(backend.target, backend.tokenizer).generate([prompt], GenParams(max_new_tokens=12))[0]
    got = backend.generate([prompt], GenParams(max_new_tokens=12))[0]
    assert got.text == want.text and got.meta["drafted"] >= 0


def test_one_stall_does_not_lock_a_good_draft_out():
    cfg = SpecConfig(prior_acceptance=0.9)
    ctl = DraftController(cfg, has_model=True, lookup=False)
    for _ in range(6):  # a draft token costs a tenth of a target step, and is accepted
        src, k = ctl.choose(12, 0)
        ctl.drafted(src, k, 0.001 * k)
        ctl.verified(k + 1, 0.010 + 0.0005 * (k + 1))
        ctl.accepted(src, k, k)
    ctl.drafted("model", 4, 4 * 1.0)  # one draft step stalled for seconds
    assert ctl.choose(12, 0)[1] > 0


def test_a_new_draft_kind_is_one_registered_function(target, tiny_tok, tiny_dir, capsys, monkeypatch):
    """A draft made from the target, registered beside its maker with @draft_kind, is found by name by speculate,
    slmkit speculate --draft and the speculative stage's draft:, with no other edit (issue 18)."""
    from slmkit.cli import main
    from slmkit.collab.drafters import DRAFT_KINDS, ModelDrafter, draft_kind, find_draft_kind, layer_draft, resolve_draft
    from slmkit.errors import ConfigError
    from slmkit.pipeline.stages.collab import SpeculativeStageConfig
    from slmkit.pipeline.typed import RecipeError, build_config

    monkeypatch.setattr(DRAFT_KINDS, "_items", dict(DRAFT_KINDS._items))
    made = []

    @draft_kind("seam-half", summary="the {target}'s first half of its blocks")
    def half_kind(tgt, arg, lookup):
        model = layer_draft(tgt, len(tgt.model.layers) // 2)
        made.append(lookup)
        return ModelDrafter(model, lookup=True) if lookup else model

    ids = torch.tensor(tiny_tok(REPEATED).input_ids)
    assert speculate(target, "seam-half", ids, SpecConfig(max_new_tokens=16)).tokens == _hf_greedy(target, ids, 16)
    assert made == [True]  # speculate's string drafts draft with prompt lookup too, as int4/int8
    draft = resolve_draft("seam-half", target, tiny_tok)
    assert len(draft.model.layers) == 1 and made[-1] is None
    assert main(["speculate", "--draft", "seam-half", "--target", str(tiny_dir), "The cat", "--max-new-tokens", "6",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["identical_to_target"] is True and res["draft"] == "seam-half"
    assert build_config(SpeculativeStageConfig, {"draft": "seam-half"}, "stage 2").draft == "seam-half"
    assert build_config(SpeculativeStageConfig, {"draft": "layers:2"}, "stage 2").draft == "layers:2"

    # kinds with an argument take a positive integer; a MODEL spec with a colon is not a kind
    assert find_draft_kind("layers:2")[1] == "2" and find_draft_kind("C:/models/small") is None
    for bad in ("layers:x", "layers:\u00b2"):  # a superscript digit is a digit to str.isdigit, not to int()
        with pytest.raises(ConfigError, match="layers:N needs a positive integer N"):
            find_draft_kind(bad)
    with pytest.raises(ConfigError, match=r"the draft \(--draft\): layers:N needs a positive integer N, got 'layers:0'"):
        resolve_draft("layers:0", target, tiny_tok, what="the draft (--draft)")
    with pytest.raises(RecipeError, match="stage 2: draft must be one of student, recommended, int4, int8, layers:N, "
                                          "lookup, seam-half, got 'int2'"):
        build_config(SpeculativeStageConfig, {"draft": "int2"}, "stage 2")
    with pytest.raises(ConfigError, match="draft must be a model or a draft kind"):
        speculate(target, "int2", ids, SpecConfig(max_new_tokens=4))
    monkeypatch.undo()
    assert "seam-half" not in DRAFT_KINDS

"""slmkit.runtime.decoding.draw and sample: the inverse-CDF draw keeps multinomial's law, and top-p's
candidate shortcut picks the same nucleus as sorting the whole vocabulary."""

from __future__ import annotations

import torch

from slmkit.runtime import decoding
from slmkit.runtime.decoding import draw, sample


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(probs * 7.0, g) for _ in range(n)]), minlength=6).double()  # any total
    assert counts[[0, 2, 5]].sum() == 0
    expected = probs.double() * n
    chi2 = float(((counts[[1, 3, 4]] - expected[[1, 3, 4]]) ** 2 / expected[[1, 3, 4]]).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_draw_is_seeded():
    probs = torch.softmax(torch.randn(50000), -1)
    a = [draw(probs, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(a)) == 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(probs, g1) for _ in range(20)] == [draw(probs, g2) for _ in range(20)]


def nucleus_by_sort(logits, temperature, top_p):
    probs = torch.softmax(logits / temperature, -1)
    sp, si = probs.sort(descending=True)
    keep = sp.cumsum(-1) - sp < top_p
    return set(si[keep].tolist())


def test_top_p_draws_only_from_the_sorted_nucleus(monkeypatch):
    torch.manual_seed(0)
    for sharp, candidates in ((4.0, 1024), (0.3, 1024), (0.3, 8)):  # peaked, flat (fallback to the sort), tiny top-k
        monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", candidates)
        logits = torch.randn(5000) * sharp
        nucleus = nucleus_by_sort(logits, 0.8, 0.9)
        g = torch.Generator().manual_seed(1)
        got = {sample(logits, 0.8, 0.9, g) for _ in range(400)}
        assert got <= nucleus
        if len(nucleus) <= 20:
            assert len(got) > 1 or len(nucleus) == 1


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 3.0, -1.0])
    assert sample(logits, 0.0, 1.0, None) == 1

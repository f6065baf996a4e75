"""The server's numbers do not depend on what else it runs (issue 19: gen-data rows identical at any concurrency)."""

import shutil
import threading

import pytest
import torch

from slmkit.runtime import generate as G
from slmkit.runtime import q4kernel
from slmkit.runtime.engine import Engine, Event, Request

CAN_BUILD = q4kernel.cpu_supported()[0] and any(shutil.which(c) for c in ("cc", "gcc", "g++"))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason=f"q4 kernel cannot be built here: {q4kernel.cpu_supported()[1] or 'no C compiler'}")


def _run(engine: Engine, prompts: list[torch.Tensor], seeds: list[int], at_once: bool) -> list[list[int]]:
    """Every prompt sampled at temperature 0.9 with its own seed: all submitted together or one after another."""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emit_to(i):
        def emit(ev: Event) -> None:
            outs[i].extend(ev.tokens)
            if ev.kind in ("done", "error"):
                assert ev.kind == "done", ev.text
                done[i].set()
        return emit

    reqs = [Request(p, 24, emit_to(i), temperature=0.9, seed=s) for i, (p, s) in enumerate(zip(prompts, seeds))]
    for r, d in zip(reqs, done):
        engine.submit(r)
        if not at_once:
            assert d.wait(120)
    assert all(d.wait(120) for d in done)
    return outs


@needs_kernel
def test_int4_requests_get_the_same_tokens_alone_and_together(lively):
    """Prompts of different lengths (one longer than DEQUANT_FROM_TOKENS, read in several chunks while the
    others decode): each request's sampled tokens equal the ones it gets alone, bit for bit."""
    model, tok = lively
    engine = Engine({"tiny": G.build(model, G.FastConfig(weights="int4"))}, tok)
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 200, (n,), generator=g) for n in (4, 70, 9, 33, 2, 50)]
        seeds = [11, 12, 13, 14, 15, 16]
        alone = _run(engine, prompts, seeds, at_once=False)
        together = _run(engine, prompts, seeds, at_once=True)
    finally:
        engine.close()
    assert all(len(o) > 0 for o in alone)
    assert together == alone

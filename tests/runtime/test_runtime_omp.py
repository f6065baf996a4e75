"""Releasing the main thread's idle OpenMP pool before model work moves to another thread."""

import threading

import torch

from slmkit.runtime.omp import release_pool


def test_release_pool_works_with_torchs_openmp_and_work_continues_on_any_thread():
    uses_openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    a, b = torch.randn(300_000), torch.randn(300_000)
    ref = a + b  # a parallel region on this thread: it now has a pool
    assert release_pool() is uses_openmp
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("sum", a + b))
    th.start()
    th.join()
    assert torch.equal(out["sum"], ref)
    assert torch.equal(a + b, ref)  # this thread's pool comes back on demand


def test_engine_releases_the_pool_of_the_thread_that_builds_it(lively, monkeypatch):
    from slmkit.runtime import engine as E
    from slmkit.runtime import generate as G

    calls = []
    monkeypatch.setattr(E, "release_pool", lambda: calls.append(threading.get_ident()) or True)
    model, tok = lively
    eng = E.Engine({"m": G.build(model)}, tok)
    try:
        assert calls == [threading.get_ident()]
    finally:
        eng.close()

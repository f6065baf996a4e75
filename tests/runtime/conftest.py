"""Runtime fixtures: a tiny llama whose random weights are large enough to give varied greedy text."""

import pytest

from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="session")
def lively(tiny_tok):
    """(model, tokenizer): 2 layers, hidden 64, GQA 4/2, init std 0.2 (greedy text does not collapse to one token)."""
    return tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=1), tiny_tok


@pytest.fixture(scope="session")
def fz():
    """bench/fuzz_server.py as a module: its request generator, checks and in-process server (issue 17 harness)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "fuzz_server.py"
    spec = importlib.util.spec_from_file_location("slmkit_bench_fuzz_server", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

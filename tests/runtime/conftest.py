"""Runtime fixtures: a tiny llama whose random weights are large enough to give varied greedy text."""

import pytest

from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="session")
def lively(tiny_tok):
    """(model, tokenizer): 2 layers, hidden 64, GQA 4/2, init std 0.2 (greedy text does not collapse to one token)."""
    return tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=1), tiny_tok

"""Integration tests on the embedded default model (SmolLM2-135M-Instruct)."""

import pytest

from slmkit.backends import GenParams, HFBackend
from slmkit.eval import PerplexityConfig, perplexity
from slmkit.models import describe_model

pytestmark = pytest.mark.integration


def test_default_facts(default_model):
    model, _ = default_model
    f = describe_model(model)
    assert f.layers == 30 and f.attention_heads == 9 and f.kv_heads == 3 and f.tied_embeddings
    assert 134_000_000 < f.parameters < 135_000_000


def test_default_answers_capital_of_france(default_model):
    model, tok = default_model
    out = HFBackend(model, tok).generate([[{"role": "user", "content": "What is the capital of France?"}]], GenParams(max_new_tokens=20))
    assert "Paris" in out[0].text


def test_default_wikitext_perplexity(default_model, shared_file):
    model, tok = default_model
    text = shared_file("wikitext-2/test.txt").read_text()
    res = perplexity(model, tok, text, PerplexityConfig(context=512, stride=512, max_tokens=4096))
    assert 10 < res.perplexity < 35  # measured here: about 20 on the full test set

"""Integration tests on the embedded default model (SmolLM2-135M-Instruct)."""

import pytest
import torch

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


def test_default_conversion_cache_matches_gguf(default_model):
    """After the first load, 'default' resolves to a cached safetensors copy equal to the GGUF."""
    from slmkit.export.gguf import read_gguf_weights
    from slmkit.models import load_tokenizer, resolve
    from slmkit.models.load import ModelSource
    from slmkit.models.zoo import locate

    model, tok = default_model
    assert resolve("default").kind == "dir"
    gguf = locate("default")
    gguf_tok = load_tokenizer(ModelSource("default", "zoo", str(gguf.parent), gguf.name))
    text = "Hello, world! 1234 naïve café\n\tdone."
    chat = [{"role": "user", "content": text}]
    assert tok(text).input_ids == gguf_tok(text).input_ids
    assert tok.apply_chat_template(chat, tokenize=False) == gguf_tok.apply_chat_template(chat, tokenize=False)
    ref = read_gguf_weights(gguf, model.config)
    sd = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(sd[name], ref[name], rtol=0, atol=1e-6)

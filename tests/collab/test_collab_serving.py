"""Serving modes: speculative and cascade backends behind the OpenAI-compatible collab app."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from slmkit.backends import GenParams, HFBackend
from slmkit.collab.serving import CascadeBackend, SpeculativeBackend, build_backend, create_app
from slmkit.errors import ConfigError
from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def models(tiny_tok):
    large = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=31)
    small = tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=32)
    return large, small, tiny_tok


def test_speculative_mode_serves_the_large_models_greedy_text(models):
    large, small, tok = models
    client = TestClient(create_app(SpeculativeBackend(large, tok, small), name="pair"))
    body = {"model": "pair", "prompt": "The cat sees", "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    data = r.json()
    want = HFBackend(large, tok).generate(["The cat sees"], GenParams(max_new_tokens=12))[0].text
    assert data["choices"][0]["text"] == want
    assert 0.0 <= data["slmkit"]["acceptance_rate"] <= 1.0 and data["slmkit"]["drafted"] > 0
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and "acceptance_rate" in r.json()["slmkit"]
    assert client.post("/v1/chat/completions", json={"messages": "nope"}).status_code == 400


def test_cascade_mode_escalates_by_threshold(models):
    large, small, tok = models
    s, l = HFBackend(small, tok), HFBackend(large, tok)
    prompt = [{"role": "user", "content": "Where is the river?"}]
    want_large = l.generate([prompt], GenParams(max_new_tokens=6))[0].text
    want_small = s.generate([prompt], GenParams(max_new_tokens=6))[0].text
    up = TestClient(create_app(CascadeBackend(s, l, threshold=math.inf)))
    r = up.post("/v1/chat/completions", json={"messages": prompt, "max_tokens": 6, "temperature": 0}).json()
    assert r["slmkit"]["escalated"] is True and r["choices"][0]["message"]["content"] == want_large
    stay = TestClient(create_app(CascadeBackend(s, l, threshold=-math.inf)))
    r = stay.post("/v1/chat/completions", json={"messages": prompt, "max_tokens": 6, "temperature": 0}).json()
    assert r["slmkit"]["escalated"] is False and r["choices"][0]["message"]["content"] == want_small
    assert r["slmkit"]["confidence"] < 0
    down = TestClient(create_app(CascadeBackend(s, None, threshold=math.inf)))
    r = down.post("/v1/chat/completions", json={"messages": prompt, "max_tokens": 6, "temperature": 0}).json()
    assert r["slmkit"]["source"] == "small (large unreachable)" and r["choices"][0]["message"]["content"] == want_small


def test_speculative_mode_rejects_an_endpoint(tiny_dir):
    with pytest.raises(ConfigError, match="locally"):
        build_backend(str(tiny_dir), "http://127.0.0.1:9", "speculative")
    with pytest.raises(ConfigError, match="mode"):
        build_backend(str(tiny_dir), str(tiny_dir), "telepathy")

"""The server against the official openai client, over a real uvicorn process on 127.0.0.1."""

import asyncio
import json
import time

import httpx
import pytest
import torch

from slmkit.runtime import decoding as D
from slmkit.runtime import generate as G

openai = pytest.importorskip("openai")



@pytest.fixture(scope="module")
def lively_dir(lively, tmp_path_factory):
    from slmkit.models.tiny import save_tiny

    model, tok = lively
    return save_tiny(model, tok, tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="module")
def server(lively_dir, start_server):
    url, stop = start_server(lively_dir, "--name", "tiny", "--max-body-bytes", "20000", "--max-batch", "8")
    yield url
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(lively, text: str, n: int, chat: bool = False) -> str:
    model, tok = lively
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tok(ids, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:]
    return tok.decode([t for t in out.tolist() if t != tok.eos_token_id], skip_special_tokens=True)


def test_completion_and_chat_match_local_greedy(client, lively):
    r = client.completions.create(model="tiny", prompt="The cat sees", max_tokens=12, temperature=0)
    assert r.choices[0].text == _greedy(lively, "The cat sees", 12)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where is paris?"}], max_tokens=10, temperature=0)
    assert c.choices[0].message.content == _greedy(lively, "Where is paris?", 10, chat=True)


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", max_tokens=16, temperature=0)
    whole = client.completions.create(prompt="A dog likes", **kw).choices[0].text
    parts = [ch.choices[0].text for ch in client.completions.create(prompt="A dog likes", stream=True, **kw) if ch.choices]
    assert "".join(parts) == whole and len(parts) > 2
    msgs = [{"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stop_seed_logprobs(client):
    base = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0).choices[0].text
    stop = base.strip()[3:6]
    assert stop
    cut = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert stop not in cut.text and base.startswith(cut.text) and cut.finish_reason == "stop"
    a = client.completions.create(model="tiny", prompt="The river", max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].text
    b = client.completions.create(model="tiny", prompt="The river", max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].text
    assert a == b
    r = client.completions.create(model="tiny", prompt="The river", max_tokens=5, temperature=0, logprobs=3).choices[0].logprobs
    assert len(r.token_logprobs) == 5 and all(v <= 0 for v in r.token_logprobs)
    assert all(1 <= len(t) <= 3 and max(t.values()) == pytest.approx(lp, abs=1e-5) for t, lp in zip(r.top_logprobs, r.token_logprobs))
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens


def test_echo_scoring_matches_local(server, lively):
    from slmkit.backends import HFBackend, OpenAIBackend

    model, tok = lively
    local = HFBackend(model, tok).score([" the house."], ["The cat sees"])[0]
    remote = OpenAIBackend(server).score([" the house."], ["The cat sees"])[0]
    assert remote.tokens == local.tokens
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-4)


def test_kv_policy_per_request(server):
    body = {"model": "tiny", "prompt": "The cat sees the house. " * 6, "max_tokens": 8, "temperature": 0}
    texts = {}
    for pol in ("full", "int8", "streaming"):
        r = httpx.post(server + "/v1/completions", json={**body, "kv_policy": pol, "kv_budget": 16}, timeout=60)
        assert r.status_code == 200
        texts[pol] = r.json()["choices"][0]["text"]
    assert texts["full"]  # each policy answered; streaming with 16 tokens of KV may differ from full
    r = httpx.post(server + "/v1/completions", json={**body, "kv_policy": "nope"}, timeout=30)
    assert r.status_code == 400 and "kv_policy" in r.json()["error"]["message"]


@pytest.mark.parametrize("payload,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": "tiny", "prompt": "the cat " * 400, "max_tokens": 4}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x" * 30000}).encode(), 413, None),
    (json.dumps([1, 2]).encode(), 400, None),
])
def test_invalid_requests_get_openai_4xx(server, payload, status, param):
    r = httpx.post(server + "/v1/completions", content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    assert httpx.get(server + "/health", timeout=5).status_code == 200  # still alive


def test_invalid_chat_and_client_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 600}], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_disconnect_cancels_and_metrics(server):
    """A streaming client that leaves mid-way is cancelled; the server keeps serving and counts it."""
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "The cat", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    for _ in range(100):
        m = httpx.get(server + "/metrics", timeout=5).text
        if "slmkit_requests_active 0" in m:
            break
        time.sleep(0.1)
    assert "slmkit_requests_active 0" in m and "slmkit_engine_requests_cancelled 1" in m
    assert httpx.get(server + "/health", timeout=5).json()["status"] == "ok"


def test_concurrent_streaming_clients_all_succeed(server):
    """16 streaming clients at once (bounded: 24 tokens each): zero failures, each equal to its solo answer."""
    solo = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "The small bird", "max_tokens": 24,
                                                         "temperature": 0}, timeout=60).json()["choices"][0]["text"]

    async def one(client, i):
        text = ""
        async with client.stream("POST", server + "/v1/completions", json={
                "model": "tiny", "prompt": "The small bird", "max_tokens": 24, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)), return_exceptions=True)

    results = asyncio.run(run())
    assert [r for r in results if isinstance(r, Exception)] == []
    assert all(r == solo for r in results)


def test_api_key_is_enforced(lively):
    from fastapi.testclient import TestClient

    from slmkit.runtime.engine import Engine
    from slmkit.runtime.server import ServerConfig, create_app

    model, tok = lively
    engine = Engine({"tiny": G.build(model)}, tok)
    with TestClient(create_app(engine, cfg=ServerConfig(api_key="k1"))) as tc:
        assert tc.get("/v1/models").status_code == 401
        assert tc.get("/v1/models", headers={"authorization": "Bearer k1"}).json()["data"][0]["id"] == "tiny"
        assert tc.get("/health").status_code == 200


def test_models_by_name_each_answer_with_their_own_weights(lively):
    """Two fast models behind one engine (as with LoRA adapters): the request's model picks the weights."""
    import copy

    from fastapi.testclient import TestClient

    from slmkit.runtime.engine import Engine
    from slmkit.runtime.server import create_app

    model, tok = lively
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    engine = Engine({"tiny": G.build(model), "alice": G.build(other)}, tok)
    ids = torch.tensor(tok("The cat sees").input_ids)
    with TestClient(create_app(engine)) as tc:
        assert [m["id"] for m in tc.get("/v1/models").json()["data"]] == ["tiny", "alice"]
        for name, m in (("tiny", model), ("alice", other)):
            r = tc.post("/v1/completions", json={"model": name, "prompt": "The cat sees", "max_tokens": 8, "temperature": 0})
            want = [t for t in D.generate(G.build(m), ids, 8) if t != tok.eos_token_id]
            assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


def test_non_llama_model_is_served_through_its_own_forward(tiny_tok):
    """A GPT-2 (no fast path) is still served: greedy text equals HFBackend's, echo scoring works."""
    from fastapi.testclient import TestClient
    from transformers import GPT2Config

    from slmkit.backends import GenParams, HFBackend
    from slmkit.models.tiny import tiny_model
    from slmkit.runtime.server import create_app

    gpt2 = tiny_model(GPT2Config(vocab_size=len(tiny_tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                 initializer_range=0.3, eos_token_id=tiny_tok.eos_token_id))
    be = HFBackend(gpt2, tiny_tok, name="g")
    want = be.generate(["The cat sees"], GenParams(max_new_tokens=10))[0].text
    with TestClient(create_app(be)) as tc:
        r = tc.post("/v1/completions", json={"prompt": "The cat sees", "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        r = tc.post("/v1/completions", json={"prompt": "The cat sees", "max_tokens": 0, "echo": True, "logprobs": 1})
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        local = be.prompt_logprobs("The cat sees")[1]
        assert lps[0] is None and lps[1:] == pytest.approx(local[1:], abs=1e-4)
        r = tc.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "kv_policy": "int8"})
        assert r.status_code == 400 and "fast path" in r.json()["error"]["message"]

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


def test_cascade_pairs_a_local_model_with_an_endpoint(tiny_dir):
    """The endpoint gets the pairing's retries (serve's default is 2, the client's 3) and the model after '#'."""
    b = build_backend(str(tiny_dir), "http://127.0.0.1:9#big", "cascade", retries=1)
    assert isinstance(b, CascadeBackend) and b.small.name == str(tiny_dir)
    assert (b.large.model, b.large.retries, b.large.base_url) == ("big", 1, "http://127.0.0.1:9/v1")
    assert build_backend(str(tiny_dir), "http://127.0.0.1:9#big", "cascade").large.retries == 2


# --------------------------------------------------------------------------- streaming (stream: true)

import contextlib  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from slmkit.backends.base import Completion  # noqa: E402
from slmkit.collab.privacy import Redaction, ShieldedBackend, StreamRestorer, restore  # noqa: E402

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def lively_models(tiny_tok):
    """Large/small pair whose greedy text varies (init std 0.2), so streamed pieces differ."""
    large = tiny_model(tiny_llama_config(tiny_tok, layers=2, initializer_range=0.2), seed=41)
    small = tiny_model(tiny_llama_config(tiny_tok, layers=1, initializer_range=0.2), seed=42)
    return large, small, tiny_tok


@contextlib.contextmanager
def _serve(app):
    """The app on a real uvicorn server in this process (127.0.0.1, a free port)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _meta(chunk) -> dict | None:
    return (chunk.model_extra or {}).get("slmkit")


def _stream_text(client, chat: bool, **kw) -> tuple[str, list]:
    if chat:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks
    chunks = list(client.completions.create(stream=True, **kw))
    return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks


def test_speculative_stream_equals_non_streamed_text(lively_models):
    large, small, tok = lively_models
    with _serve(create_app(SpeculativeBackend(large, tok, small), name="pair")) as url:
        c = _client(url)
        kw = dict(model="pair", prompt="The cat sees", max_tokens=24, temperature=0)
        whole = c.completions.create(**kw).choices[0].text
        text, chunks = _stream_text(c, False, **kw)
        assert text == whole == HFBackend(large, tok).generate(["The cat sees"], GenParams(max_new_tokens=24))[0].text
        assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 2  # verified chunks, not one blob
        last = chunks[-1]
        assert last.choices[0].finish_reason == "length" and 0 <= _meta(last)["acceptance_rate"] <= 1
        assert all(_meta(ch) is None for ch in chunks[:-1])
        msgs = [{"role": "user", "content": "Where is paris?"}]
        kw = dict(model="pair", messages=msgs, max_tokens=16, temperature=0)
        whole = c.chat.completions.create(**kw).choices[0].message.content
        text, chunks = _stream_text(c, True, **kw)
        assert text == whole and chunks[0].choices[0].delta.role == "assistant"
        # stop sequences end the stream before the stop string, as without streaming
        stop = whole[3:5]
        assert stop
        cut = c.chat.completions.create(stop=[stop], **kw).choices[0]
        text, chunks = _stream_text(c, True, stop=[stop], **kw)
        assert text == cut.message.content and stop not in text and whole.startswith(text)
        assert chunks[-1].choices[0].finish_reason == cut.finish_reason == "stop"


def test_cascade_stream_sends_the_decided_answer_and_its_metadata(lively_models):
    large, small, tok = lively_models
    s, l = HFBackend(small, tok), HFBackend(large, tok)
    msgs = [{"role": "user", "content": "Where is the river?"}]
    for threshold, escalated in ((math.inf, True), (-math.inf, False)):
        with _serve(create_app(CascadeBackend(s, l, threshold=threshold), name="cascade")) as url:
            c = _client(url)
            kw = dict(model="cascade", messages=msgs, max_tokens=12, temperature=0)
            whole = c.chat.completions.create(**kw)
            text, chunks = _stream_text(c, True, **kw)
            assert text == whole.choices[0].message.content
            want = (l if escalated else s).generate([msgs], GenParams(max_new_tokens=12))[0].text
            assert text == want
            meta = _meta(chunks[-1])
            assert meta["escalated"] is escalated and meta["confidence"] < 0
            assert meta["confidence"] == pytest.approx(whole.model_extra["slmkit"]["confidence"])
            assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


class EchoRemote:
    """A stand-in for the remote model: replies with the last user message it received
    (so with its placeholders), streamed ``size`` characters at a time; records what it saw."""

    name = "echo"

    def __init__(self, size: int = 3):
        self.size, self.seen = size, []

    def _reply(self, prompt) -> str:
        self.seen.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
        return "You said: " + self.seen[-1]

    def generate(self, prompts, params):
        return [Completion(self._reply(p), -1, "stop") for p in prompts]

    def stream(self, prompt, params, on_text):
        text = self._reply(prompt)
        for i in range(0, len(text), self.size):
            if on_text(text[i : i + self.size]):
                break
        return Completion(text, -1, "stop")

    def score(self, texts, contexts=None):
        raise NotImplementedError


PII = {"email": "ann.lee@example.org", "phone": "+44 20 7946 0958", "name": "Ann Lee"}
LETTER = f"My name is {PII['name']}. Mail {PII['email']} or call {PII['phone']} today; {PII['name']} again."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_shield_stream_restores_placeholders_split_across_chunks(size):
    remote = EchoRemote(size)
    with _serve(create_app(ShieldedBackend(remote), name="shield")) as url:
        c = _client(url)
        kw = dict(model="shield", messages=[{"role": "user", "content": LETTER}], max_tokens=64, temperature=0)
        whole = c.chat.completions.create(**kw)
        text, chunks = _stream_text(c, True, **kw)
    assert text == whole.choices[0].message.content == "You said: " + LETTER  # every value put back
    assert remote.seen and all(v not in seen for seen in remote.seen for v in PII.values())  # none left the device
    assert all("[EMAIL_1]" in seen and "[PHONE_1]" in seen for seen in remote.seen)  # it saw placeholders instead
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert all("[" not in p and "_1" not in p for p in pieces)  # no placeholder text, whole or in part
    assert len(pieces) > 5
    meta = _meta(chunks[-1])
    assert meta["redacted"]["email"] == 1 and meta["redacted"]["phone"] == 1 and meta["placeholders"] >= 3


def test_stream_restorer_under_adversarial_splits():
    red = Redaction()
    for kind, value in [("email", "a@b.org"), ("name", "Ann Lee"), ("phone", "+1 555 0100")] + [("name", f"P{i}") for i in range(11)]:
        red.placeholder(kind, value)
    replies = [
        "Hi [NAME_1], write to [EMAIL_1] or call PHONE_1.",
        "[NAME_1][NAME_2]NAME_3 NAME_12 xNAME_1 NAME_1x [NAME_1",
        "NAME_11,NAME_1. [[EMAIL_1]] EMAIL_1] [NAME_",
    ]
    assert restore(replies[0], red) == "Hi Ann Lee, write to a@b.org or call +1 555 0100."
    assert restore(replies[1], red).startswith("Ann LeeP0P1 P10 xNAME_1 NAME_1x ")  # NAME_12 is not NAME_1 + "2"
    rng = random.Random(0)
    for reply in replies:
        whole = restore(reply, red)
        splits = [list(c) for c in itertools.combinations(range(1, len(reply)), 2)]
        splits += [sorted(rng.sample(range(1, len(reply)), rng.randint(3, 12))) for _ in range(300)]
        splits.append(list(range(1, len(reply))))  # one character at a time
        for cuts in splits:
            bounds = [0, *cuts, len(reply)]
            r = StreamRestorer(red)
            out = [r.push(reply[a:b]) for a, b in zip(bounds, bounds[1:])] + [r.close()]
            assert "".join(out) == whole, (reply, cuts, out)
            for piece in out:  # no complete placeholder, bracketed or bare, ever goes out
                assert not any(ph in piece for ph in ("[NAME_1]", "[EMAIL_1]", "[PHONE_1]", " NAME_3", "PHONE_1."))
    r = StreamRestorer(red)  # a bracketed placeholder arriving in three parts
    assert r.push("mail [EMAIL_") == "mail " and r.push("1") == "" and r.push("] now") == "a@b.org now"


def test_shield_stream_through_an_http_remote(tiny_dir, start_server):
    """Shield over an OpenAI endpoint (slmkit serve): the remote's SSE stream is relayed, equal to non-streaming."""
    from slmkit.backends.openai import OpenAIBackend

    remote_url, stop = start_server(tiny_dir, "--name", "tiny")
    try:
        remote = OpenAIBackend(remote_url)
        msgs = [{"role": "user", "content": f"My name is {PII['name']}, mail {PII['email']}."}]
        params = GenParams(max_new_tokens=16)
        pieces: list[str] = []
        streamed = remote.stream(msgs, params, pieces.append)
        assert "".join(pieces) == streamed.text == remote.generate([msgs], params)[0].text and len(pieces) > 1
        with _serve(create_app(ShieldedBackend(remote), name="shield")) as url:
            c = _client(url)
            kw = dict(model="shield", messages=msgs, max_tokens=16, temperature=0)
            text, chunks = _stream_text(c, True, **kw)
            assert text == c.chat.completions.create(**kw).choices[0].message.content
            assert _meta(chunks[-1])["redacted"]["email"] == 1
    finally:
        stop()


class SlowStream:
    """Wraps a streaming backend, pausing after each piece (a slow model); records the last completion."""

    def __init__(self, inner):
        self.inner, self.name, self.done = inner, inner.name, []

    def generate(self, prompts, params):
        return self.inner.generate(prompts, params)

    def stream(self, prompt, params, on_text):
        def slow(piece):
            time.sleep(0.02)
            return on_text(piece)

        self.done.append(self.inner.stream(prompt, params, slow))
        return self.done[-1]

    def score(self, texts, contexts=None):
        return self.inner.score(texts, contexts)


def test_client_disconnect_stops_generation(lively_models):
    large, small, tok = lively_models
    backend = SlowStream(SpeculativeBackend(large, tok, small))
    full = backend.generate(["The cat sees"], GenParams(max_new_tokens=400))[0].tokens
    assert full > 300  # this prompt runs long without an EOS
    with _serve(create_app(backend, name="pair")) as url:
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "The cat sees", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        for _ in range(200):
            if backend.done and httpx.get(url + "/health", timeout=5).json()["active"] == 0:
                break
            time.sleep(0.05)
        assert backend.done and backend.done[0].tokens < 100  # stopped long before its end
        # the server keeps serving
        again = httpx.post(url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 5, "temperature": 0}, timeout=60)
        assert again.status_code == 200


def test_cascade_generate_batches_escalations(lively_models):
    """Batched cascade: one small call and one large call for the whole list, same answers as one at a time."""
    large, small, tok = lively_models

    class Counting:
        def __init__(self, inner):
            self.inner, self.name, self.calls = inner, inner.name, []

        def generate(self, prompts, params):
            self.calls.append(len(prompts))
            return self.inner.generate(prompts, params)

        def score(self, texts, contexts=None):
            return self.inner.score(texts, contexts)

    prompts = ["The cat sees", [{"role": "user", "content": "Where is the river?"}], "A dog likes", "My friend"]
    s, l = Counting(HFBackend(small, tok)), Counting(HFBackend(large, tok))
    first = HFBackend(small, tok).generate(prompts, GenParams(max_new_tokens=8, logprobs=True))
    confs = sorted(sum(c.logprobs) / len(c.logprobs) for c in first)
    threshold = (confs[1] + confs[2]) / 2  # two escalate, two stay
    cas = CascadeBackend(s, l, threshold)
    batched = cas.generate(prompts, GenParams(max_new_tokens=8))
    assert s.calls == [4] and l.calls == [2]
    single = [cas.generate([p], GenParams(max_new_tokens=8))[0] for p in prompts]
    assert [(c.text, c.meta["escalated"]) for c in batched] == [(c.text, c.meta["escalated"]) for c in single]
    assert sum(c.meta["escalated"] for c in batched) == 2

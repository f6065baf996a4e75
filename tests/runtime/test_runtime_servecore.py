"""The server core shared by ``slmkit serve`` and the collaboration modes (issue 17): validation,
limits, queue, timeouts, cancellation, per-request error isolation, errors in OpenAI's shape."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from slmkit.backends.base import Completion
from slmkit.collab.serving import SpeculativeBackend
from slmkit.collab.serving import create_app as collab_app
from slmkit.errors import ConfigError
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.runtime import engine as engine_mod
from slmkit.runtime import generate as G
from slmkit.runtime.engine import Engine, Event
from slmkit.runtime.engine import Request as Job
from slmkit.runtime.server import create_app
from slmkit.runtime.servecore import ServerConfig, parse_json


@pytest.fixture(scope="module")
def small(tiny_tok):
    return tiny_model(tiny_llama_config(tiny_tok, layers=1, initializer_range=0.2), seed=42)


def _serve_app(lively, cfg=None):
    model, tok = lively
    return create_app(Engine({"tiny": G.build(model)}, tok), cfg=cfg or ServerConfig(max_body_bytes=20000))


def _collab_app(lively, small, cfg=None, backend=None):
    model, tok = lively
    return collab_app(backend or SpeculativeBackend(model, tok, small), name="tiny", cfg=cfg or ServerConfig(max_body_bytes=20000))


@pytest.fixture(scope="module", params=["serve", "collab"])
def app_client(request, lively, small):
    app = _serve_app(lively) if request.param == "serve" else _collab_app(lively, small)
    with TestClient(app) as tc:
        yield request.param, tc


def _is_openai_error(r) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]


BAD = [  # (raw body, status, param); each fails alone with OpenAI's error shape on both servers
    ('{"prompt": "x", "seed": 18446744073709551616}', 400, "seed"),
    ('{"prompt": "x", "seed": -1}', 400, "seed"),
    ('{"prompt": "x", "temperature": NaN}', 400, None),
    ('{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ('{"prompt": "x", "top_p": -Infinity}', 400, None),
    ('{"prompt": "x", "max_tokens": Infinity}', 400, None),
    ('{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 2.5}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 100000}', 400, "prompt"),
    ('{"prompt": "x", "model": ["tiny"]}', 400, "model"),
    ('{"prompt": "x", "stream": true, "stream_options": [1]}', 400, "stream_options"),
    ('{"prompt": "x", "stream": true, "stream_options": {"include_usage": "yes"}}', 400, "include_usage"),
    ('{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ('{"prompt": "x", "stop": [1]}', 400, "stop"),
    ('{"prompt": "\\ud800"}', 400, "prompt"),
    ('{"prompt": "x", "n": 2}', 400, "n"),
    ('{"prompt": "x", "x": ' + "[" * 100 + "]" * 100 + "}", 400, None),
    ("[" * 19_000, 400, None),  # deep enough for RecursionError in a recursive parser
    ('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400, None),
    ("\xff\xfe", 400, None),
    ("", 400, None),
]


@pytest.mark.parametrize("raw,status,param", BAD)
def test_malformed_requests_fail_alone_in_openai_shape(app_client, raw, status, param):
    _, tc = app_client
    r = tc.post("/v1/completions", content=raw.encode("utf-8", "surrogateescape"), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert _is_openai_error(r) and r.json()["error"]["param"] == param
    ok = tc.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_messages_are_checked_alike(app_client, fz):
    _, tc = app_client
    for msgs in ("hi", [], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url"}]}], [{"role": "user", "content": "\ud800"}]):
        r = tc.post("/v1/chat/completions", content=fz.dumps({"messages": msgs, "max_tokens": 2}), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and _is_openai_error(r), (msgs, r.text)
    r = tc.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                              "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200


def test_unknown_routes_and_methods_use_openai_shape(app_client):
    _, tc = app_client
    for r, status in ((tc.get("/v2/nothing"), 404), (tc.get("/v1/completions"), 405)):
        assert r.status_code == status and _is_openai_error(r)


def test_max_tokens_zero_is_zero_or_an_error_never_sixteen(app_client):
    kind, tc = app_client
    r = tc.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 0, "temperature": 0})
    if kind == "serve":  # scoring with echo needs 0: an empty completion
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "" and r.json()["usage"]["completion_tokens"] == 0
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = tc.post("/v1/completions", json={"prompt": "The cat", "temperature": 1e-300, "max_tokens": 3, "seed": 2**64 - 1})
    assert r.status_code == 200  # a temperature that would overflow decodes greedily; the largest seed works


@pytest.mark.parametrize("kind", ["serve", "collab"])
def test_api_key_guards_v1_and_metrics(lively, small, kind):
    cfg = ServerConfig(api_key="k1")
    app = _serve_app(lively, cfg) if kind == "serve" else _collab_app(lively, small, cfg)
    with TestClient(app) as tc:
        for h in ({}, {"authorization": "Bearer k2"}, {"authorization": "Bearer k1x"}, {"authorization": "k1"}):
            for path in ("/v1/models", "/metrics"):
                r = tc.get(path, headers=h)
                assert r.status_code == 401 and _is_openai_error(r) and r.json()["error"]["code"] == "invalid_api_key"
        good = {"authorization": "Bearer k1"}
        assert tc.get("/metrics", headers=good).status_code == 200 and tc.get("/v1/models", headers=good).status_code == 200
        assert tc.get("/health").status_code == 200


def test_engine_refuses_requests_it_cannot_run(lively):
    model, tok = lively
    eng = Engine({"tiny": G.build(model)}, tok)
    try:
        ids = torch.tensor(tok("The cat").input_ids)
        for kw in ({"seed": 2**64}, {"seed": -1}, {"temperature": float("nan")}, {"temperature": 1e-300},
                   {"top_p": 0.0}, {"max_new_tokens": -1}, {"model": "other"}):
            with pytest.raises(ConfigError):
                eng.submit(Job(**{"ids": ids, "max_new_tokens": 4, "emit": lambda ev: None, **kw}))
        with pytest.raises(ConfigError):
            eng.submit(Job(ids=torch.tensor([len(tok) + 5]), max_new_tokens=2, emit=lambda ev: None))
    finally:
        eng.close()


def _run(eng: Engine, jobs: list[Job], events: dict, timeout: float = 60.0) -> None:
    for j in jobs:
        eng.submit(j)
    t0 = time.monotonic()
    while not all(any(e.kind in ("done", "error") for e in events[id(j)]) for j in jobs):
        assert time.monotonic() - t0 < timeout, "a request never ended"
        time.sleep(0.01)


def test_one_failing_request_fails_alone_in_the_batch(lively):
    """A request whose delivery raises mid-decode ends with an error; the others in its batch finish unchanged."""
    model, tok = lively
    eng = Engine({"tiny": G.build(model)}, tok)
    try:
        events: dict = {}

        def job(prompt: str, poisoned: bool = False) -> Job:
            box: list[Event] = []

            def emit(ev: Event) -> None:
                if poisoned and ev.kind == "delta" and len(box) >= 2:
                    raise RuntimeError("client callback broke")
                box.append(ev)

            j = Job(ids=torch.tensor(tok(prompt).input_ids), max_new_tokens=12, emit=emit)
            events[id(j)] = box
            return j

        solo = [job(p) for p in ("The cat sees", "A dog likes")]
        _run(eng, solo, events)
        together = [job("The cat sees"), job("The river", poisoned=True), job("A dog likes")]
        _run(eng, together, events)

        def text(j):
            return "".join(e.text for e in events[id(j)] if e.kind == "delta")

        assert text(together[0]) == text(solo[0]) and text(together[2]) == text(solo[1])
        assert [e.text for e in events[id(together[1])] if e.kind == "error"] == ["internal error"]
        assert eng.stats["errors"] == 1
    finally:
        eng.close()


def test_stream_failing_mid_way_gets_an_error_event_and_done(lively, monkeypatch, fz):
    """The engine failing during decoding: each stream gets one OpenAI-shaped error event (no exception
    text) and [DONE]; the server keeps serving."""
    real = engine_mod.forward
    calls = {"n": 0}

    def flaky(fm, segs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("secret internal detail")
        return real(fm, segs)

    monkeypatch.setattr(engine_mod, "forward", flaky)
    with fz.serve_app(_serve_app(lively)) as url:
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "The cat", "max_tokens": 20, "temperature": 0, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["message"] == "internal error" and err["type"] == "server_error" and "secret" not in "".join(lines)
        r = httpx.post(url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.status_code == 200
        m = httpx.get(url + "/metrics", timeout=5).text
        assert 'slmkit_responses_total{status="stream_error_500"} 1' in m


class Scripted:
    """A backend that streams ``pieces`` with ``pause`` s between them, then optionally raises."""

    name = "scripted"

    def __init__(self, pieces=("a", "b", "c"), pause: float = 0.0, fail: BaseException | None = None, gate=None):
        self.pieces, self.pause, self.fail, self.gate, self.started = pieces, pause, fail, gate, 0

    def generate(self, prompts, params):
        raise AssertionError("the collab app streams")

    def stream(self, prompt, params, on_text):
        self.started += 1
        if self.gate is not None:
            self.gate.wait(30)
        for p in self.pieces:
            if on_text(p):
                break
            time.sleep(self.pause)
        if self.fail is not None:
            raise self.fail
        return Completion("".join(self.pieces), len(self.pieces), "length", None, {"k": 1})

    def score(self, texts, contexts=None):
        raise NotImplementedError


def _sse_lines(r) -> list[str]:
    return [ln for ln in r.iter_lines() if ln.startswith("data: ")]


def test_collab_failure_mid_stream_and_500_without_text(lively, small):
    be = Scripted(fail=RuntimeError("secret internal detail"))
    with TestClient(_collab_app(lively, small, backend=be)) as tc:
        with tc.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 3}) as r:
            lines = _sse_lines(r)
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["message"] == "internal error"
        assert "secret" not in "".join(lines)
        r = tc.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 500 and _is_openai_error(r) and "secret" not in r.text
        be.fail = None
        r = tc.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc" and r.json()["slmkit"] == {"k": 1}


def test_collab_timeout_ends_requests(lively, small):
    be = Scripted(pieces=tuple("abcdefghij" * 10), pause=0.05)
    with TestClient(_collab_app(lively, small, ServerConfig(request_timeout_s=0.3), backend=be)) as tc:
        t0 = time.monotonic()
        r = tc.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error" and time.monotonic() - t0 < 3
        with tc.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 3}) as r:
            lines = _sse_lines(r)
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "timeout"


def test_collab_queue_is_bounded(lively, small, fz):
    gate = threading.Event()
    be = Scripted(gate=gate)
    with fz.serve_app(_collab_app(lively, small, ServerConfig(max_queue=1), backend=be)) as url:
        results: list = []

        def call():
            results.append(httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        for _ in range(200):  # the first is running (waiting at the gate)
            if be.started:
                break
            time.sleep(0.01)
        threads[1].start()
        for _ in range(200):  # the second is queued
            if httpx.get(url + "/health", timeout=5).json()["queued"] == 1:
                break
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        for t in threads:
            t.join(30)
        assert sorted(results) == [200, 200]


def test_parse_json_is_strict():
    assert parse_json(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    for raw in (b'{"a": NaN}', b'{"a": -Infinity}', b"[" * 100_000, b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}"):
        with pytest.raises(Exception) as e:
            parse_json(raw)
        assert getattr(e.value, "status", None) == 400

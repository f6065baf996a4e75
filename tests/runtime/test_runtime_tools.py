"""Structured output and tool calling through the server (issue 22), with the official openai client."""

import contextlib
import json
import socket
import threading
import time

import httpx
import jsonschema
import pytest

from slmkit.runtime import tools
from slmkit.runtime.engine import Engine, EngineConfig
from slmkit.runtime.generate import build
from slmkit.runtime.server import create_app

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit", "days"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 30},
                                                                      "k": {"type": "integer", "minimum": 1, "maximum": 10}},
                                     "required": ["q"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "langs": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]}},
    "required": ["name", "age", "langs", "address"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@contextlib.contextmanager
def _serve(app):
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


@pytest.fixture(scope="module")
def url(tiny_tok):
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    tok = tiny_tok  # the fallback tool prompt is long in the tiny tokenizer: a context of 2048
    model = tiny_model(tiny_llama_config(tok, initializer_range=0.2, max_position_embeddings=2048), seed=1)
    engine = Engine({"tiny": build(model)}, tok, EngineConfig(max_batch=8))
    with _serve(create_app(engine)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_calls(calls, allowed=("get_weather", "search")):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_response_format_json_schema_and_json_object(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for temperature in (0, 1.0):
        for i in range(3):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Person {i}"}], max_tokens=80,
                                               temperature=temperature, seed=i, response_format=rf)
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # streamed, and on /v1/completions
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=80, response_format=rf, stream=True) if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = client.completions.create(model="tiny", prompt="The cat", max_tokens=80, extra_body={"response_format": rf})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "search"}}])
def test_tool_calls_required_and_named(client, choice):
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, SEARCH], tool_choice=choice,
                                           max_tokens=120, temperature=temperature, seed=3, parallel_tool_calls=False)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls, ("search",) if isinstance(choice, dict) else ("get_weather", "search"))


def test_streamed_tool_call_deltas_assemble_into_valid_arguments(client):
    for seed in range(3):
        stream = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, SEARCH], tool_choice="required",
                                                max_tokens=400, temperature=1.0, seed=seed, stream=True)
        calls: dict[int, dict] = {}
        pieces, finish = 0, None
        for chunk in stream:
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            finish = chunk.choices[0].finish_reason or finish
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert c["id"] is None  # id and name come once, in the call's first delta
                    c["id"], c["name"] = tc.id, tc.function.name
                c["arguments"] += tc.function.arguments or ""
                pieces += 1
        assert finish == "tool_calls" and calls
        for c in calls.values():
            assert c["id"].startswith("call_") and c["name"] in PARAMS
            jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])
        assert pieces > len(calls) + 1  # arguments arrive in several pieces, not one blob


def test_auto_and_none(client):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="auto", max_tokens=60,
                                           temperature=1.0, seed=seed)
        m = r.choices[0].message
        if m.tool_calls:
            _check_calls(m.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"
        else:
            assert "<tool_call>" not in m.content
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)


def test_history_with_tool_calls_and_results(client):
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
     "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"enum": []}},
                                                                             "required": ["a"]}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
])
def test_bad_structured_requests_are_400_in_openai_shape(url, extra, param):
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 8, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error" and err["param"] == param
    # the same through the openai client
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, extra_body=extra)


def test_constrained_and_free_requests_share_a_batch(client):
    """Continuous batching: constrained requests decode beside free ones, each keeps its own form."""
    import concurrent.futures as cf

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def one(i):
        if i % 2:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=80,
                                               temperature=1.0, seed=i, response_format=rf)
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        else:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=30,
                                               temperature=1.0, seed=i)
            assert r.choices[0].message.content is not None
        return True

    with cf.ThreadPoolExecutor(6) as ex:
        assert all(ex.map(one, range(6)))


def test_call_stream_parser_pieces():
    """Text split anywhere gives the same calls; a text answer stays content."""
    text = '<tool_call>\n{"name":"search","arguments":{"q":"a \\"b\\" }","k":2}}\n</tool_call>\n<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call>'
    for step in (1, 3, 7, len(text)):
        cs = tools.CallStream()
        deltas = [d for i in range(0, len(text), step) for d in cs.feed(text[i : i + step])]
        msg = cs.message()
        assert [c["function"]["name"] for c in msg["tool_calls"]] == ["search", "get_weather"]
        assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"q": 'a "b" }', "k": 2}
        args = "".join(tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls", []) if tc["index"] == 0)
        assert args == msg["tool_calls"][0]["function"]["arguments"]
    cs = tools.CallStream()
    assert cs.feed("  <tool") == [] and cs.feed("bar>") == [{"content": "  <toolbar>"}]
    assert cs.message() == {"role": "assistant", "content": "  <toolbar>"}


def test_fallback_prompt_and_template_tools(lively):
    _, tok = lively
    assert not tools.template_knows_tools(tok)
    p = tools.render(tok, MSGS, [WEATHER])
    assert "get_weather" in p and "<tool_call>" in p and p.endswith("<|im_start|>assistant\n")

"""OpenAI-compatible HTTP server over the continuous-batching :class:`~slmkit.runtime.engine.Engine`.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``POST /v1/completions`` and ``POST /v1/chat/completions``, both with streaming
(server-sent events, ``stream: true``), stop sequences, ``max_tokens``,
temperature/top-p, ``seed`` and log-probs. ``echo`` + ``logprobs`` with
``max_tokens: 0`` scores a prompt, as vLLM does (what
:meth:`slmkit.backends.OpenAIBackend.score` uses).

Concurrency: requests go into a bounded queue and are *continuously batched*:
the engine admits new requests between decoding steps (see
:mod:`slmkit.runtime.engine`). Extensions to the OpenAI request body:
``kv_policy`` (``full``, ``int8``, ``int4``, ``streaming``, ``h2o``) and
``kv_budget`` (tokens) choose the KV cache per request.

Limits: request bodies over ``max_body_bytes`` get 413, a full queue 429, prompts
that do not fit the context 400 (``context_length_exceeded``); a request that
runs past ``request_timeout_s`` ends with 504 (or an error event when streaming);
a client that disconnects cancels its request at the next step. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; an optional
API key is checked on ``/v1``. Binds to 127.0.0.1 unless told otherwise.

Several models by name: ``models`` maps each served name to a fast model
(LoRA adapters loaded through issue 5's ``AdapterSet`` and merged into copies of
the base, see :func:`adapter_models`; ``slmkit serve MODEL --adapter NAME=DIR``);
the request's ``model`` picks one. Requests for different models are batched
per model within each step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import queue
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from slmkit.backends.hf import render_prompt
from slmkit.errors import ConfigError, SlmkitError
from slmkit.runtime import sse
from slmkit.runtime.engine import Engine, EngineConfig, Event
from slmkit.runtime.engine import Request as Job
from slmkit.runtime.kvcache import KV_POLICIES


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  #: require ``Authorization: Bearer KEY`` on /v1
    max_body_bytes: int = 1_000_000  #: larger request bodies get HTTP 413
    request_timeout_s: float = 300.0  #: a request running longer ends with a timeout
    max_stop: int = 16  #: stop strings per request at most
    default_max_tokens: int = 16  #: when the request gives none (OpenAI's completions default)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _num(body: dict, key: str, default, cast, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(400, f"{key} must be a number, got {v!r}", key)
    v = cast(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(400, f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def create_app(backend_or_engine, model_name: str | None = None, api_key: str | None = None, cfg: ServerConfig | None = None):
    """The FastAPI app. Pass an :class:`Engine`, or an :class:`~slmkit.backends.HFBackend` over a llama model."""
    cfg = cfg or ServerConfig(api_key=api_key)
    if api_key and not cfg.api_key:
        cfg = ServerConfig(**{**cfg.__dict__, "api_key": api_key})
    engine = backend_or_engine
    if not isinstance(engine, Engine):
        from slmkit.runtime.generate import runner

        name = model_name or backend_or_engine.name
        engine = Engine({name: runner(backend_or_engine.model)}, backend_or_engine.tokenizer)
    elif model_name:
        engine.models = {model_name if k == engine.default else k: v for k, v in engine.models.items()}
        engine.default = model_name
    tok = engine.tok
    latencies: collections.deque[float] = collections.deque(maxlen=2000)
    counts: collections.Counter = collections.Counter()
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="slmkit", version="1", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            counts["401"] += 1
            return _error(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            counts["413"] += 1
            return _error(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}")
        try:
            return await call_next(request)
        except Exception as err:  # never a bare 500 page: OpenAI-shaped error, server stays up
            counts["500"] += 1
            return _error(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.default, "active": engine.active, "queued": engine.queued}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        lat = sorted(latencies)
        q = (lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else 0.0)
        lines = [
            f"slmkit_requests_active {engine.active}",
            f"slmkit_requests_queued {engine.queued}",
            *(f'slmkit_responses_total{{status="{k}"}} {v}' for k, v in sorted(counts.items())),
            *(f"slmkit_engine_{k} {v}" for k, v in engine.stats.items()),
            f'slmkit_request_seconds{{quantile="0.5"}} {q(0.5):.4f}',
            f'slmkit_request_seconds{{quantile="0.95"}} {q(0.95):.4f}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmkit"} for n in engine.models]}

    async def _read(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise BadRequest(413, f"request body of {len(raw)} bytes exceeds the limit of {cfg.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "request body must be a JSON object")
        m = body.get("model")
        if m is not None and m not in engine.models:
            raise BadRequest(404, f"model {m!r} does not exist; this server serves {', '.join(map(repr, engine.models))}",
                             "model", "invalid_request_error", "model_not_found")
        if _num(body, "n", 1, int, 1, 1) != 1:
            raise BadRequest(400, "only n=1 is supported", "n")
        return body

    def _job(body: dict, ids: list[int], emit, max_tokens_key: tuple[str, ...], echo: bool = False, top: int = 0) -> Job:
        mt = None
        for k in max_tokens_key:
            if body.get(k) is not None:
                mt = _num(body, k, None, int, 0)
                break
        model = body.get("model") or engine.default
        ctx = engine.context_of(model)
        if mt is None:
            mt = min(cfg.default_max_tokens, max(ctx - len(ids), 0))
        if len(ids) + mt > ctx:
            raise BadRequest(400, f"this model's context is {ctx} tokens, but the request needs {len(ids)} prompt + {mt} "
                             "completion tokens; shorten the prompt or lower max_tokens", "messages" if "messages" in body else "prompt",
                             code="context_length_exceeded")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > cfg.max_stop:
            raise BadRequest(400, f"stop must be a string or a list of at most {cfg.max_stop} strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest(400, "seed must be an integer", "seed")
        kv = body.get("kv_policy") or "full"
        if not isinstance(kv, str) or kv not in KV_POLICIES:
            raise BadRequest(400, f"unknown kv_policy {kv!r}; known: {', '.join(KV_POLICIES.names())}", "kv_policy")
        budget = _num(body, "kv_budget", None, int, 2)
        if budget is None and kv in ("streaming", "h2o"):
            budget = 1024
        try:  # a 2-token cache: checks that this model supports the policy and its options
            engine.models[model].new_cache(kv, context=2, budget=budget)
        except ConfigError as err:
            raise BadRequest(400, str(err).splitlines()[0], "kv_policy") from None
        return Job(
            ids=torch.tensor(ids, dtype=torch.long), max_new_tokens=mt, emit=emit,
            temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
            top_p=_num(body, "top_p", 1.0, float, 1e-6, 1.0), seed=seed, stop=tuple(s for s in stop if s),
            top_logprobs=top, echo_logprobs=echo, kv_policy=kv, kv_budget=budget, model=model,
            deadline=time.monotonic() + cfg.request_timeout_s,
        )

    def _channel():
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        return q, emit

    def _submit(job: Job) -> None:
        try:
            engine.submit(job)
        except queue.Full:
            raise BadRequest(429, "the server's queue is full; retry later", kind="rate_limit_error") from None

    async def _collect(request: Request, q: asyncio.Queue, job: Job) -> list[Event]:
        """All events of a non-streaming job; cancels it if the client disconnects."""
        events = []
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return events
                continue
            events.append(ev)
            if ev.kind in ("done", "error"):
                return events

    def _handle(fn):
        @functools.wraps(fn)
        async def wrapper(request: Request):
            t0 = time.perf_counter()
            try:
                resp = await fn(request)
            except BadRequest as e:
                counts[str(e.status)] += 1
                return _error(e.status, e.message, e.param, e.kind, e.code)
            except SlmkitError as e:
                counts["400"] += 1
                return _error(400, str(e).splitlines()[0])
            if not isinstance(resp, StreamingResponse):
                counts[str(resp.status_code)] += 1
                latencies.append(time.perf_counter() - t0)
            return resp

        return wrapper

    def _stream(request: Request, q: asyncio.Queue, job: Job, chunk, final_usage: bool, prompt_tokens: int):
        t0 = time.perf_counter()

        async def gen():
            ok = False
            try:
                first = True
                while True:
                    ev = await q.get()
                    if ev.kind == "error":
                        yield sse.error_event(ev.text, code=ev.finish_reason)
                        break
                    if ev.kind == "delta":
                        yield sse.event(chunk(ev, first, None))
                        first = False
                    if ev.kind == "done":
                        yield sse.event(chunk(Event("delta"), first, ev.finish_reason))
                        if final_usage:
                            yield sse.event(sse.usage_chunk(chunk(Event("delta"), False, None), prompt_tokens, len(ev.tokens)))
                        ok = True
                        break
                yield sse.DONE
            finally:  # the client went away (task cancelled) or we finished
                job.cancel()
                counts["200" if ok else "stream_aborted"] += 1
                latencies.append(time.perf_counter() - t0)

        return sse.response(gen())

    @app.post("/v1/completions")
    @_handle
    async def completions(request: Request):
        body = await _read(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if max(ids) >= len(tok) or min(ids) < 0:
                raise BadRequest(400, "prompt token ids out of the vocabulary", "prompt")
            prompt = tok.decode(ids)
        elif isinstance(prompt, str):
            ids = tok(prompt).input_ids
        else:
            raise BadRequest(400, "prompt must be a string (or one list of token ids)", "prompt")
        echo = bool(body.get("echo"))
        lp_k = body.get("logprobs")
        want_lp = lp_k is not None and lp_k is not False
        top = _num(body, "logprobs", 0, int, 0, 20) if want_lp and not isinstance(lp_k, bool) else 0
        if not ids:
            pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [pid if pid is not None else 0]
        q, emit = _channel()
        job = _job(body, ids, emit, ("max_tokens",), echo=echo and want_lp, top=top)
        _submit(job)
        cid, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())

        def lp_block(ev: Event, offset: int) -> dict | None:
            if not want_lp or not ev.tokens:
                return None
            toks = [tok.decode([t]) for t in ev.tokens]
            offs, pos = [], offset
            for t in toks:
                offs.append(pos)
                pos += len(t)
            return {"tokens": toks, "token_logprobs": ev.logprobs, "text_offset": offs, "top_logprobs": ev.top or None}

        if body.get("stream"):
            sent = {"n": len(prompt) if echo else 0, "echoed": False}

            def chunk(ev: Event, first: bool, finish):
                text = ev.text
                if echo and not sent["echoed"]:
                    text, sent["echoed"] = prompt + text, True
                block = lp_block(ev, sent["n"])
                sent["n"] += len(ev.text)
                return sse.text_chunk(cid, created, job.model, text, finish, block)

            inc = bool((body.get("stream_options") or {}).get("include_usage"))
            return _stream(request, q, job, chunk, inc, len(ids))

        events = await _collect(request, q, job)
        end = events[-1] if events else Event("error", text="client disconnected")
        if end.kind == "error":
            status = {"timeout": 504, "invalid": 400}.get(end.finish_reason, 500)
            raise BadRequest(status, end.text, kind="timeout_error" if status == 504 else "server_error" if status == 500 else "invalid_request_error")
        deltas = [e for e in events if e.kind == "delta"]
        text = "".join(e.text for e in deltas)
        logprobs = None
        if want_lp:
            merged = Event("delta", tokens=[t for e in deltas for t in e.tokens], logprobs=[x for e in deltas for x in e.logprobs],
                           top=[x for e in deltas for x in e.top])
            gen_block = lp_block(merged, len(prompt) if echo else 0) or {"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": None}
            if echo:
                ptoks = tok.convert_ids_to_tokens(ids)
                offs, pos = [], 0
                for t in ptoks:
                    offs.append(pos)
                    pos += len(tok.convert_tokens_to_string([t]))
                # the first token has no history: OpenAI/vLLM report None for it
                logprobs = {"tokens": ptoks + gen_block["tokens"], "token_logprobs": (end.prompt_logprobs or [None] * len(ids)) + gen_block["token_logprobs"],
                            "text_offset": offs + gen_block["text_offset"], "top_logprobs": None}
            else:
                logprobs = gen_block
        n = len(end.tokens)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": job.model,
            "choices": [{"index": 0, "text": (prompt if echo else "") + text, "finish_reason": end.finish_reason, "logprobs": logprobs}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        })

    @app.post("/v1/chat/completions")
    @_handle
    async def chat(request: Request):
        body = await _read(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in messages
        ):
            raise BadRequest(400, "messages must be a non-empty list of {role, content} objects with string content", "messages")
        try:
            text = render_prompt(tok, [{"role": m["role"], "content": m["content"]} for m in messages])
        except SlmkitError as err:
            raise BadRequest(400, str(err).splitlines()[0], "messages") from None
        except Exception as err:  # a template that rejects these roles
            raise BadRequest(400, f"the chat template rejected these messages: {err}", "messages") from None
        ids = tok(text, add_special_tokens=False).input_ids
        want_lp = bool(body.get("logprobs"))
        top = _num(body, "top_logprobs", 0, int, 0, 20) if want_lp else 0
        q, emit = _channel()
        job = _job(body, ids, emit, ("max_completion_tokens", "max_tokens"), top=top)
        _submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

        def content_lp(ev: Event) -> dict | None:
            if not want_lp or not ev.tokens:
                return None
            items = []
            for i, (t, lp) in enumerate(zip(ev.tokens, ev.logprobs)):
                s = tok.decode([t])
                alts = [{"token": k, "logprob": v, "bytes": list(k.encode())} for k, v in (ev.top[i].items() if ev.top else [])]
                items.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alts})
            return {"content": items}

        if body.get("stream"):
            def chunk(ev: Event, first: bool, finish):
                return sse.chat_chunk(cid, created, job.model, ev.text, first, finish, content_lp(ev))

            inc = bool((body.get("stream_options") or {}).get("include_usage"))
            return _stream(request, q, job, chunk, inc, len(ids))

        events = await _collect(request, q, job)
        end = events[-1] if events else Event("error", text="client disconnected")
        if end.kind == "error":
            status = {"timeout": 504, "invalid": 400}.get(end.finish_reason, 500)
            raise BadRequest(status, end.text, kind={504: "timeout_error", 400: "invalid_request_error"}.get(status, "server_error"))
        deltas = [e for e in events if e.kind == "delta"]
        merged = Event("delta", tokens=[t for e in deltas for t in e.tokens], logprobs=[x for e in deltas for x in e.logprobs],
                       top=[x for e in deltas for x in e.top])
        n = len(end.tokens)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(e.text for e in deltas)},
                         "finish_reason": end.finish_reason, "logprobs": content_lp(merged)}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        })

    return app


def adapter_models(base_model, tokenizer, adapters: dict[str, str], fast_cfg=None, base_name: str = "base") -> dict:
    """Fast models for LoRA adapters by name, each adapter merged into its own copy of ``base_model``.

    Loading and checking go through :class:`slmkit.train.adapters.AdapterSet` (it
    validates names and refuses an adapter trained on another base model); each
    adapter is then merged (W + s B A, Hu et al. 2021) so it decodes at the speed
    of the base. Memory grows by one set of weights per adapter. ``base_model`` is
    not modified.
    """
    import copy

    from slmkit.runtime.generate import FastConfig, build
    from slmkit.train.adapters import AdapterSet

    aset = AdapterSet(copy.deepcopy(base_model), tokenizer, name=base_name)
    for name, path in adapters.items():
        aset.add(name, path)
    out = {}
    for name in adapters:
        with aset.use(name) as backend:  # the PEFT model with this adapter active
            merged = copy.deepcopy(backend.model).merge_and_unload(adapter_names=[name])
        out[name] = build(merged.eval(), fast_cfg or FastConfig())
    return out


def serve(backend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cfg: ServerConfig | None = None, engine_cfg: EngineConfig | None = None, fast_cfg=None,
          adapters: dict[str, str] | None = None, gguf=None) -> None:
    """Serve ``backend``'s model (an :class:`~slmkit.backends.HFBackend`) on host:port until interrupted.

    With ``gguf`` (the file the model was loaded from) the base model runs the file's own quantised
    blocks (:func:`slmkit.runtime.gguffast.build_gguf`); adapters merge into the dequantised weights.
    """
    import uvicorn

    from slmkit.runtime.generate import FastConfig, runner, supports

    fast_cfg = fast_cfg or FastConfig()
    if gguf is not None and supports(backend.model):  # other architectures serve through their own forward
        from slmkit.runtime.gguffast import build_gguf

        models = {backend.name: build_gguf(gguf, fast_cfg, backend.model)}
    else:
        models = {backend.name: runner(backend.model, fast_cfg)}
    if adapters:
        models.update(adapter_models(backend.model, backend.tokenizer, adapters, fast_cfg, base_name=backend.name))
    engine = Engine(models, backend.tokenizer, engine_cfg or EngineConfig(), default=backend.name)
    cfg = cfg or ServerConfig(api_key=api_key)
    uvicorn.run(create_app(engine, cfg=cfg), host=host, port=port, log_level="warning")

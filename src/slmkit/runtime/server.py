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

Limits, validation and errors come from the server core shared with the
collaboration modes (:mod:`slmkit.runtime.servecore`): request bodies over
``max_body_bytes`` get 413 (chunked ones too: reading stops at the limit), a full
queue 429, prompts that do not fit the context 400 (``context_length_exceeded``),
malformed fields 400 (NaN/Infinity, seeds past 64 bits, wrong types); a request
that runs past ``request_timeout_s`` ends with 504 (or an error event when
streaming); a client that disconnects cancels its request at the next step. Errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and a 500
never carries exception text; an optional API key (compared in constant time) is
checked on ``/v1`` and ``/metrics``. Binds to 127.0.0.1 unless told otherwise.

Several models by name: ``models`` maps each served name to a fast model
(LoRA adapters merged into copies of the base by :func:`slmkit.train.adapters.merged_models`,
passed to :func:`serve` as ``extra_models``; ``slmkit serve MODEL --adapter NAME=DIR``);
the request's ``model`` picks one. Requests for different models are batched
per model within each step.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from slmkit.errors import ConfigError, SlmkitError
from slmkit.runtime import servecore as core
from slmkit.runtime import sse, tools
from slmkit.runtime.engine import Engine, EngineConfig, Event
from slmkit.runtime.engine import Request as Job
from slmkit.runtime.kvcache import KV_POLICIES
from slmkit.runtime.servecore import ApiError, ServerConfig

__all__ = ["ServerConfig", "EngineRoutes", "create_app", "serve"]


def create_app(backend_or_engine, model_name: str | None = None, api_key: str | None = None, cfg: ServerConfig | None = None):
    """The FastAPI app. Pass an :class:`Engine`, or an :class:`~slmkit.backends.HFBackend` over a llama model.

    ``/health``, ``/metrics`` and ``/v1/models`` come from the shared core (:func:`slmkit.runtime.servecore.base_app`);
    the completions endpoints are :class:`EngineRoutes`' methods.
    """
    cfg = cfg or ServerConfig(api_key=api_key)
    if api_key and not cfg.api_key:
        cfg = replace(cfg, api_key=api_key)
    engine = _engine_of(backend_or_engine, model_name)
    stats = core.Stats()
    app = core.base_app("slmkit", engine, cfg, stats, lambda: engine.models, lambda: engine.default, "slmkit_engine_")
    app.state.engine = engine
    routes = EngineRoutes(engine, cfg, stats)
    app.post("/v1/completions")(core.handler(stats)(routes.completions))
    app.post("/v1/chat/completions")(core.handler(stats)(routes.chat))
    return app


def _engine_of(backend_or_engine, model_name: str | None) -> Engine:
    """The engine to serve: the one given (its default model renamed to ``model_name`` when given), or a new one
    over a backend's model (:func:`slmkit.runtime.gguffast.fast_runner`)."""
    engine = backend_or_engine
    if not isinstance(engine, Engine):
        from slmkit.runtime.gguffast import fast_runner  # an fp32 model from a GGUF file: its blocks in full precision

        name = model_name or backend_or_engine.name
        engine = Engine({name: fast_runner(backend_or_engine.model)}, backend_or_engine.tokenizer)
    elif model_name:
        engine.models = {model_name if k == engine.default else k: v for k, v in engine.models.items()}
        engine.default = model_name
    return engine


@dataclass
class EngineRoutes:
    """The OpenAI endpoints over one :class:`Engine`: each request's checks become an engine job, and its
    events an OpenAI response (or a stream of chunks)."""

    engine: Engine
    cfg: ServerConfig
    stats: core.Stats

    def job(self, body: dict, s: core.Sampling, ids: list[int], emit, echo: bool = False, top: int = 0, mask=None) -> Job:
        """The engine job of a checked request: token budget, KV policy and budget (400 naming the field when wrong)."""
        engine, cfg = self.engine, self.cfg
        model = s.model or engine.default
        ctx = engine.context_of(model)
        mt = core.budget(s, len(ids), ctx, cfg, "messages" if "messages" in body else "prompt")
        kv = body.get("kv_policy")
        kv = "full" if kv is None else kv
        if not isinstance(kv, str) or kv not in KV_POLICIES:
            raise ApiError(400, f"unknown kv_policy {core.brief(kv)}; known: {', '.join(KV_POLICIES.names())}", "kv_policy")
        budget = core.integer(body, "kv_budget", None, 2, core.MAX_TOKENS_MAX)
        if budget is None and kv in ("streaming", "h2o"):
            budget = 1024
        if budget is not None:
            budget = max(2, min(budget, ctx))  # a budget past the context keeps the whole context
        try:  # a 2-token cache: checks that this model supports the policy and its options
            engine.models[model].new_cache(kv, context=2, budget=budget)
        except ConfigError as err:
            raise ApiError(400, str(err).splitlines()[0], "kv_policy") from None
        return Job(
            ids=torch.tensor(ids, dtype=torch.long), max_new_tokens=mt, emit=emit,
            temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=s.stop,
            top_logprobs=top, echo_logprobs=echo, kv_policy=kv, kv_budget=budget, model=model,
            deadline=time.monotonic() + cfg.request_timeout_s, mask=mask,
        )

    def mask(self, st: tools.Structured, model: str | None):
        """The request's token mask (None: free text); an unusable schema or grammar is a 400 naming its field."""
        if st.constraint is None:
            return None
        try:
            return self.engine.token_mask(st.constraint, model or self.engine.default)
        except SlmkitError as err:
            raise ApiError(400, str(err).splitlines()[0], st.param) from None

    async def completions(self, request: Request):
        """``POST /v1/completions``: text or token-id prompts, echo, log-probs (echo + ``max_tokens: 0`` scores a prompt)."""
        tok, cfg = self.engine.tok, self.cfg
        body = await core.read_json(request, cfg)
        s = core.sampling(body, cfg, self.engine.models)
        prompt = core.prompt_of(body, len(tok))
        if isinstance(prompt, list):
            ids, prompt = prompt, tok.decode(prompt)
        else:
            ids = tok(prompt).input_ids
        echo = core.flag(body, "echo")
        lp_k = body.get("logprobs")
        want_lp = lp_k is not None and lp_k is not False
        top = core.integer(body, "logprobs", 0, 0, 20) if want_lp and lp_k is not True else 0
        if not ids:
            pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [pid if pid is not None else 0]
        ch = core.Channel()
        rf, param = tools.response_format_of(body)
        job = self.job(body, s, ids, ch.emit, echo=echo and want_lp, top=top, mask=self.mask(tools.Structured(rf, param), s.model))
        wait_until = core.submit(self.engine, job, cfg)
        answer = _TextAnswer(tok, f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time()), job.model, prompt, ids, echo, want_lp)
        if s.stream:
            return core.stream_response(ch, job, wait_until, self.stats, *answer.stream(s.include_usage))
        return answer.response(await core.collect(request, ch, job, wait_until))

    async def chat(self, request: Request):
        """``POST /v1/chat/completions``: the model's chat template, log-probs, structured output and tool calls."""
        tok, cfg = self.engine.tok, self.cfg
        body = await core.read_json(request, cfg)
        s = core.sampling(body, cfg, self.engine.models, ("max_completion_tokens", "max_tokens"))
        st = tools.structured_of(body)
        messages = tools.chat_messages(body)
        try:
            rendered = tools.render(tok, messages, st.prompt_tools)
        except SlmkitError as err:
            raise ApiError(400, str(err).splitlines()[0], "messages") from None
        except Exception as err:  # a template that rejects these roles or their order
            why = f": {core.brief(str(err), 200)}" if core.template_error(err) else ""
            raise ApiError(400, f"the chat template rejected these messages{why}", "messages") from None
        ids = tok(rendered, add_special_tokens=False).input_ids
        want_lp = core.flag(body, "logprobs")
        top = core.integer(body, "top_logprobs", 0, 0, 20) if want_lp else 0
        ch = core.Channel()
        job = self.job(body, s, ids, ch.emit, top=top, mask=self.mask(st, s.model))
        wait_until = core.submit(self.engine, job, cfg)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        answer = (_ToolAnswer(cid, created, job.model, len(ids)) if st.calls
                  else _ChatAnswer(tok, cid, created, job.model, len(ids), want_lp))
        if s.stream:
            return core.stream_response(ch, job, wait_until, self.stats, *answer.stream(s.include_usage))
        return answer.response(await core.collect(request, ch, job, wait_until))


def _merged(deltas: list[Event]) -> Event:
    return Event("delta", tokens=[t for e in deltas for t in e.tokens], logprobs=[x for e in deltas for x in e.logprobs],
                 top=[x for e in deltas for x in e.top])


def _usage(n_prompt: int, end: Event) -> dict:
    n = len(end.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


@dataclass
class _TextAnswer:
    """A ``/v1/completions`` answer: chunks while streaming, or one response with the echoed prompt and log-probs."""

    tok: object
    cid: str
    created: int
    model: str
    prompt: str
    ids: list[int]
    echo: bool
    want_lp: bool

    def lp_block(self, ev: Event, offset: int) -> dict | None:
        if not self.want_lp or not ev.tokens:
            return None
        toks = [self.tok.decode([t]) for t in ev.tokens]
        offs, pos = [], offset
        for t in toks:
            offs.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": ev.logprobs, "text_offset": offs, "top_logprobs": ev.top or None}

    def stream(self, include_usage: bool):
        """``chunk`` and ``finish`` for :func:`slmkit.runtime.servecore.stream_response`."""
        sent = {"n": len(self.prompt) if self.echo else 0, "echoed": False}

        def chunk(ev: Event, first: bool, finish=None) -> dict:
            piece = ev.text
            if self.echo and not sent["echoed"]:
                piece, sent["echoed"] = self.prompt + piece, True
            block = self.lp_block(ev, sent["n"])
            sent["n"] += len(ev.text)
            return sse.text_chunk(self.cid, self.created, self.model, piece, finish, block)

        def finish(ev: Event, first: bool) -> list[dict]:
            last = chunk(Event("delta"), first, ev.finish_reason)
            extra = [sse.usage_chunk(chunk(Event("delta")), len(self.ids), len(ev.tokens))] if include_usage else []
            return [last, *extra]

        return chunk, finish

    def logprobs(self, deltas: list[Event], end: Event) -> dict | None:
        """The response's ``logprobs``: the generated tokens', after the prompt's when echoed (as vLLM scores a prompt)."""
        if not self.want_lp:
            return None
        tok = self.tok
        gen_block = self.lp_block(_merged(deltas), len(self.prompt) if self.echo else 0) or {
            "tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": None}
        if not self.echo:
            return gen_block
        ptoks = tok.convert_ids_to_tokens(self.ids)
        offs, pos = [], 0
        for t in ptoks:
            offs.append(pos)
            pos += len(tok.convert_tokens_to_string([t]))
        # the first token has no history: OpenAI/vLLM report None for it
        return {"tokens": ptoks + gen_block["tokens"],
                "token_logprobs": (end.prompt_logprobs or [None] * len(self.ids)) + gen_block["token_logprobs"],
                "text_offset": offs + gen_block["text_offset"], "top_logprobs": None}

    def response(self, events: list[Event]) -> JSONResponse:
        end = core.finished(events)
        deltas = [e for e in events if e.kind == "delta"]
        text = "".join(e.text for e in deltas)
        return JSONResponse({
            "id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": (self.prompt if self.echo else "") + text, "finish_reason": end.finish_reason,
                         "logprobs": self.logprobs(deltas, end)}],
            "usage": _usage(len(self.ids), end),
        })


@dataclass
class _ChatAnswer:
    """A ``/v1/chat/completions`` answer in plain text, with per-token log-probs when asked."""

    tok: object
    cid: str
    created: int
    model: str
    n_prompt: int
    want_lp: bool

    def content_lp(self, ev: Event) -> dict | None:
        if not self.want_lp or not ev.tokens:
            return None
        items = []
        for i, (t, lp) in enumerate(zip(ev.tokens, ev.logprobs)):
            piece = self.tok.decode([t])
            alts = [{"token": k, "logprob": v, "bytes": list(k.encode())} for k, v in (ev.top[i].items() if ev.top else [])]
            items.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts})
        return {"content": items}

    def stream(self, include_usage: bool):
        """``chunk`` and ``finish`` for :func:`slmkit.runtime.servecore.stream_response`."""
        cid, created, model = self.cid, self.created, self.model

        def chunk(ev: Event, first: bool) -> dict:
            return sse.chat_chunk(cid, created, model, ev.text, first, None, self.content_lp(ev))

        def finish(ev: Event, first: bool) -> list[dict]:
            last = sse.chat_chunk(cid, created, model, "", first, ev.finish_reason)
            extra = [sse.usage_chunk(sse.chat_chunk(cid, created, model, "", False), self.n_prompt, len(ev.tokens))] if include_usage else []
            return [last, *extra]

        return chunk, finish

    def response(self, events: list[Event]) -> JSONResponse:
        end = core.finished(events)
        deltas = [e for e in events if e.kind == "delta"]
        return JSONResponse({
            "id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(e.text for e in deltas)},
                         "finish_reason": end.finish_reason, "logprobs": self.content_lp(_merged(deltas))}],
            "usage": _usage(self.n_prompt, end),
        })


@dataclass
class _ToolAnswer:
    """A chat answer that may hold tool calls: OpenAI's ``tool_calls`` (streamed as deltas), finish ``tool_calls``."""

    cid: str
    created: int
    model: str
    n_prompt: int

    def stream(self, include_usage: bool):
        """``chunk`` and ``finish`` for :func:`slmkit.runtime.servecore.stream_response`."""
        cid, created, model = self.cid, self.created, self.model
        calls = tools.CallStream()
        state = {"first": True}

        def chunk(ev: Event, first: bool) -> dict | None:
            deltas = calls.feed(ev.text)
            if not deltas:
                return None
            merged: dict = {}
            for d in deltas:  # one chunk per engine event: content pieces joined, call deltas listed
                if "content" in d:
                    merged["content"] = merged.get("content", "") + d["content"]
                else:
                    merged.setdefault("tool_calls", []).extend(d["tool_calls"])
            c = tools.delta_chunk(cid, created, model, merged, state["first"])
            state["first"] = False
            return c

        def finish(ev: Event, first: bool) -> list[dict]:
            out = [tools.delta_chunk(cid, created, model, d, state["first"]) for d in calls.finish()]
            msg = calls.message()
            reason = "tool_calls" if msg.get("tool_calls") and ev.finish_reason == "stop" else ev.finish_reason
            out.append(tools.delta_chunk(cid, created, model, {}, state["first"] and not out, reason))
            if include_usage:
                out.append(sse.usage_chunk(tools.delta_chunk(cid, created, model, {}, False), self.n_prompt, len(ev.tokens)))
            return out

        return chunk, finish

    def response(self, events: list[Event]) -> JSONResponse:
        end = core.finished(events)
        calls = tools.CallStream()
        for e in events:
            if e.kind == "delta":
                calls.feed(e.text)
        calls.finish()
        msg = calls.message()
        reason = "tool_calls" if msg.get("tool_calls") and end.finish_reason == "stop" else end.finish_reason
        return JSONResponse({
            "id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": msg, "finish_reason": reason, "logprobs": None}],
            "usage": _usage(self.n_prompt, end),
        })


def serve(backend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cfg: ServerConfig | None = None, engine_cfg: EngineConfig | None = None, fast_cfg=None,
          extra_models: dict | None = None, gguf=None) -> None:
    """Serve ``backend``'s model (an :class:`~slmkit.backends.HFBackend`) on host:port until interrupted.

    ``extra_models`` (transformers models by name, e.g. LoRA adapters merged into copies of the base:
    :func:`slmkit.train.adapters.merged_models`) are served beside it on the fast path, picked by the
    request's ``model``. With ``gguf`` (the file the model was loaded from) the base model runs the file's
    own quantised blocks (:func:`slmkit.runtime.gguffast.build_gguf`); adapters merge into the dequantised weights.
    """
    from slmkit.runtime.generate import FastConfig, build, supports

    fast_cfg = fast_cfg or FastConfig()
    if gguf is not None and supports(backend.model):  # other architectures serve through their own forward
        from slmkit.runtime.gguffast import build_gguf

        models = {backend.name: build_gguf(gguf, fast_cfg, backend.model)}
    else:  # an fp32 model loaded from a GGUF file: that file's blocks in full precision (gguffast.exact_model)
        from slmkit.runtime.gguffast import fast_runner

        models = {backend.name: fast_runner(backend.model, fast_cfg)}
    for name, model in (extra_models or {}).items():
        models[name] = build(model, fast_cfg)
    engine = Engine(models, backend.tokenizer, engine_cfg or EngineConfig(), default=backend.name)
    cfg = cfg or ServerConfig(api_key=api_key)
    core.run(create_app(engine, cfg=cfg), host, port, cfg)

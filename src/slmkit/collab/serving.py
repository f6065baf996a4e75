"""Collaboration behind the Backend Protocol, and an OpenAI-compatible app that serves it.

``slmkit serve SMALL --large URL_OR_MODEL --mode speculative|cascade|shield`` builds one of

* :class:`SpeculativeBackend`: the large (local) model decodes, drafted by the small one;
* :class:`CascadeBackend`: the small model answers, low-confidence answers escalate;
* :class:`~slmkit.collab.privacy.ShieldedBackend`: personal data is replaced by
  placeholders on the device before the large endpoint sees the request;

and serves it with :func:`create_app`: ``/health``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (with ``stream: true`` as server-sent events), where every
response (the final chunk, when streaming) carries the per-request metadata under
``"slmkit"`` (``escalated``, ``confidence``, ``acceptance_rate``, ``redacted``, ...).

Streaming: speculative mode sends each verified chunk as the target accepts it;
cascade mode decides first (the small answer is generated whole), then sends the
small answer or streams the large one; shield mode streams the large reply with
placeholders restored, holding back a placeholder split across pieces until it is whole.
"""


import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import torch

from slmkit.backends.base import Backend, Completion, GenParams, Prompt, TokenScores
from slmkit.backends.stream import OnText, TokenText, generate_streaming
from slmkit.errors import BackendError, SlmkitError

log = logging.getLogger(__name__)


class SpeculativeBackend:
    """Generates with :func:`~slmkit.collab.speculative.speculate` (target = large, draft = small).

    :meth:`stream` hands out each verified chunk of tokens as soon as the target accepts it;
    stop strings end decoding as soon as they appear (streaming or not).
    """

    def __init__(self, target, tokenizer, draft, name: str | None = None, k_max: int = 12):
        from slmkit.backends.hf import HFBackend
        from slmkit.collab.speculative import FastDrafter, check_same_vocab

        if not isinstance(draft, (str, FastDrafter)):  # speculate() checks a FastDrafter's vocabulary
            check_same_vocab(target, draft)
        self.target, self.tokenizer, self.draft, self.k_max = target, tokenizer, draft, k_max
        self._hf = HFBackend(target, tokenizer)
        self.name = name or f"speculative({self._hf.name})"

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        # one sequence at a time: speculative decoding verifies one sequence's drafts per target pass
        return [self._one(p, params, i, None) for i, p in enumerate(prompts)]

    def stream(self, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
        return self._one(prompt, params, 0, on_text)

    def _one(self, prompt: Prompt, params: GenParams, i: int, on_text: OnText | None) -> Completion:
        from slmkit.backends.hf import _truncate_at_stop, render_prompt
        from slmkit.collab.speculative import SpecConfig, speculate

        if params.max_new_tokens == 0:
            return Completion("", 0, "length")
        tok = self.tokenizer
        eos = {t for t in (tok.eos_token_id, self.target.generation_config.eos_token_id) if isinstance(t, int)}
        cfg = SpecConfig(max_new_tokens=params.max_new_tokens, k=min(4, self.k_max), k_max=self.k_max,
                         temperature=params.temperature, top_p=params.top_p, eos_token_ids=tuple(eos))
        ids = tok(render_prompt(tok, prompt), add_special_tokens=isinstance(prompt, str)).input_ids or [tok.eos_token_id or 0]
        gen = torch.Generator().manual_seed((params.seed or 0) + i)
        text = TokenText(tok, params.stop, on_text, eos)  # stops decoding at a stop string or when on_text says so
        res = speculate(self.target, self.draft, torch.tensor(ids), cfg, gen, on_tokens=text.push)
        text.close()
        body = [t for t in res.tokens if t not in eos]
        out, hit_stop = _truncate_at_stop(tok.decode(body, skip_special_tokens=True), params.stop)
        reason = "stop" if res.finish_reason == "stop" or hit_stop else "length"
        meta = {"acceptance_rate": None if math.isnan(res.acceptance_rate) else res.acceptance_rate,
                "drafted": res.drafted, "accepted": res.accepted, "target_calls": res.target_calls}
        return Completion(out, len(res.tokens), reason, None, meta)

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return self._hf.score(texts, contexts)


class CascadeBackend:
    """Small first; escalate when the mean token log-prob of its answer is below ``threshold``.

    Confidence is the FrugalGPT-style mean token log-probability (see
    :mod:`slmkit.collab.cascade`). :meth:`generate` answers all prompts with the small
    model in one call and sends every escalated prompt to the large one in one call.
    :meth:`stream` must decide first, so it generates the small answer whole, then
    streams either it (one piece) or the large model's answer.
    """

    def __init__(self, small: Backend, large: Backend | None, threshold: float, fallback: bool = True):
        self.small, self.large, self.threshold, self.fallback = small, large, threshold, fallback
        self.name = f"cascade({small.name}->{large.name if large is not None else 'unreachable'})"

    def _first(self, prompts: Sequence[Prompt], params: GenParams) -> tuple[list[Completion], list[float]]:
        first = self.small.generate(prompts, replace(params, logprobs=True))
        return first, [sum(c.logprobs) / len(c.logprobs) if c.logprobs else -math.inf for c in first]

    def _meta(self, conf: float) -> dict:
        return {"escalated": False, "confidence": conf if math.isfinite(conf) else None, "source": "small"}

    def _answer(self, c: Completion, meta: dict, params: GenParams) -> Completion:
        return Completion(c.text, c.tokens, c.finish_reason, c.logprobs if params.logprobs else None, {**c.meta, **meta})

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        first, confs = self._first(prompts, params)
        metas = [self._meta(conf) for conf in confs]
        up = [i for i, conf in enumerate(confs) if conf < self.threshold]
        large: dict[int, Completion] = {}
        if up and self.large is None:
            for i in up:
                metas[i]["source"] = "small (large unreachable)"
        elif up:
            try:
                large = dict(zip(up, self.large.generate([prompts[i] for i in up], params)))
                for i in up:
                    metas[i].update(escalated=True, source="large")
            except BackendError as err:
                if not self.fallback:
                    raise
                for i in up:
                    metas[i].update(source="small (large unreachable)", large_error=str(err).splitlines()[0])
        return [self._answer(large.get(i, c), m, params) for i, (c, m) in enumerate(zip(first, metas))]

    def stream(self, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
        first, confs = self._first([prompt], params)
        c, meta = first[0], self._meta(confs[0])
        if confs[0] < self.threshold and self.large is None:
            meta["source"] = "small (large unreachable)"
        elif confs[0] < self.threshold:
            sent: list[str] = []

            def relay(piece: str):
                sent.append(piece)
                return on_text(piece)

            try:
                c = generate_streaming(self.large, prompt, params, relay)
                meta.update(escalated=True, source="large")
                return self._answer(c, meta, params)
            except BackendError as err:
                if not self.fallback or sent:  # part of the large answer is already out: cannot switch now
                    raise
                meta.update(source="small (large unreachable)", large_error=str(err).splitlines()[0])
        if c.text:
            on_text(c.text)
        return self._answer(c, meta, params)

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return self.small.score(texts, contexts)


def _err(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}})


def create_app(backend: Backend, name: str | None = None, api_key: str | None = None):
    """A minimal OpenAI-compatible app over any Backend; one request at a time; metadata under ``slmkit``.

    ``stream: true`` answers with server-sent events in OpenAI's chunk format
    (:mod:`slmkit.runtime.sse`), through :func:`~slmkit.backends.stream.generate_streaming`:
    backends with a ``stream`` method send text as they generate, others in one piece.
    The final chunk carries ``finish_reason`` and the request's ``slmkit`` metadata. A client
    that disconnects stops generation at the backend's next piece of text.
    """
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from slmkit.runtime import sse
    from slmkit.runtime.omp import release_pool

    name = name or backend.name
    release_pool()  # the models were loaded on this thread; its idle OpenMP pool would slow the request threads
    lock = threading.Lock()
    running = [0]  # generations in progress (streaming or not)
    app = FastAPI(title="slmkit collab", version="1")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return _err(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name, "active": running[0]}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "slmkit"}]}

    def _params(body: dict):
        try:
            stop = body.get("stop") or ()
            return GenParams(
                max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
                temperature=float(1.0 if body.get("temperature") is None else body["temperature"]),
                top_p=float(1.0 if body.get("top_p") is None else body["top_p"]),
                seed=body.get("seed"), stop=(stop,) if isinstance(stop, str) else tuple(stop),
            ), None
        except (SlmkitError, ValueError, TypeError) as err:
            return None, _err(400, str(err).splitlines()[0])

    def _guarded(fn):
        """Run ``fn`` under the lock; (result, None) or (None, (message, type, status))."""
        with lock:
            running[0] += 1
            try:
                return fn(), None
            except BackendError as err:
                return None, (str(err).splitlines()[0], "upstream_error", 502)
            except SlmkitError as err:
                return None, (str(err).splitlines()[0], "invalid_request_error", 400)
            finally:
                running[0] -= 1
                release_pool()  # requests run on several worker threads: an idle pool slows the next one (runtime/omp.py)

    async def _run(params: GenParams, prompt: Prompt):
        c, bad = await run_in_threadpool(_guarded, lambda: backend.generate([prompt], params)[0])
        return (c, None) if bad is None else (None, _err(bad[2], bad[0], bad[1]))

    def _stream(body: dict, params: GenParams, prompt: Prompt, chunk):
        """SSE over ``generate_streaming`` in a worker thread; ``chunk(text, first, finish)`` shapes each event."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        def on_text(piece: str) -> bool:
            put(("delta", piece))
            return gone.is_set()

        def work() -> None:
            if gone.is_set():
                return put(("error", ("client disconnected", "server_error", 499)))
            c, bad = _guarded(lambda: generate_streaming(backend, prompt, params, on_text))
            put(("done", c) if bad is None else ("error", bad))

        threading.Thread(target=work, name="slmkit-collab-stream", daemon=True).start()
        usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            try:
                first = True
                while True:
                    kind, item = await q.get()
                    if kind == "delta":
                        if item:
                            yield sse.event(chunk(item, first, None))
                            first = False
                        continue
                    if kind == "error":
                        yield sse.error_event(item[0], item[1])
                        break
                    yield sse.event({**chunk("", first, item.finish_reason), "slmkit": item.meta})
                    if usage:
                        yield sse.event(sse.usage_chunk(chunk("", False, None), None, max(item.tokens, 0)))
                    break
                yield sse.DONE
            finally:  # finished, or the client went away (the generator is closed)
                gone.set()

        return sse.response(events())

    async def _body(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return None, _err(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return None, _err(400, "request body must be a JSON object")
        return body, None

    def _usage(c: Completion) -> dict:
        return {"completion_tokens": max(c.tokens, 0)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, bad = await _body(request)
        if bad is not None:
            return bad
        if not isinstance(body.get("prompt"), str):
            return _err(400, "'prompt' must be a string")
        params, bad = _params(body)
        if bad is not None:
            return bad
        cid, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        if body.get("stream"):
            return _stream(body, params, body["prompt"], lambda text, first, finish: sse.text_chunk(cid, created, name, text, finish))
        c, bad = await _run(params, body["prompt"])
        if bad is not None:
            return bad
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": _usage(c), "slmkit": c.meta}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, bad = await _body(request)
        if bad is not None:
            return bad
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
            return _err(400, "'messages' must be a non-empty list of {role, content}")
        params, bad = _params(body)
        if bad is not None:
            return bad
        prompt = [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in msgs]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        if body.get("stream"):
            return _stream(body, params, prompt, lambda text, first, finish: sse.chat_chunk(cid, created, name, text, first, finish))
        c, bad = await _run(params, prompt)
        if bad is not None:
            return bad
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}],
                "usage": _usage(c), "slmkit": c.meta}

    return app


def build_backend(small_spec: str, large_spec: str, mode: str, dtype: str = "fp32", threshold: float = -1.0,
                  timeout: float = 60.0, retries: int = 2) -> Backend:
    """The Backend behind ``slmkit serve SMALL --large ... --mode ...``."""
    from slmkit.backends import HFBackend
    from slmkit.backends.openai import OpenAIBackend
    from slmkit.errors import ConfigError

    def remote(spec):
        url, _, model = spec.partition("#")
        return OpenAIBackend(url, model=model or None, timeout=timeout, retries=retries)

    is_url = large_spec.startswith(("http://", "https://"))
    if mode == "speculative":
        if is_url:
            raise ConfigError("speculative mode needs the large model's logits locally; --large must be a model, not a URL",
                              "use --mode cascade or shield with an endpoint")
        from slmkit.collab.speculative import resolve_draft
        from slmkit.models import load

        target, t_tok = load(large_spec, dtype=dtype)
        draft = resolve_draft(small_spec, target, t_tok, dtype, "the draft (SMALL)")
        name = f"speculative({large_spec})" if small_spec == "lookup" else f"speculative({small_spec}->{large_spec})"
        return SpeculativeBackend(target, t_tok, draft, name=name)
    small = HFBackend.from_spec(small_spec, dtype=dtype)
    if mode == "cascade":
        try:
            large = remote(large_spec) if is_url else HFBackend.from_spec(large_spec, dtype=dtype)
        except BackendError as err:
            log.warning("large model unreachable (%s); the cascade answers from the small model", err)
            large = None
        return CascadeBackend(small, large, threshold)
    if mode == "shield":
        from slmkit.collab.privacy import ShieldedBackend

        return ShieldedBackend(remote(large_spec) if is_url else HFBackend.from_spec(large_spec, dtype=dtype), small=small)
    raise ConfigError(f"unknown --mode {mode!r}; use speculative, cascade or shield")

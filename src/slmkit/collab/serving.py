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

The app runs on the server core shared with ``slmkit serve`` (:mod:`slmkit.runtime.servecore`):
the same validation, body limit, bounded queue, timeout, cancellation and error shape.
"""


import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from fastapi import Request

from slmkit.backends import from_model, from_spec, is_endpoint
from slmkit.backends.base import Backend, Completion, GenParams, Prompt, TokenScores
from slmkit.backends.stream import OnText, TokenText, generate_streaming
from slmkit.errors import BackendError, ConfigError, SlmkitError
from slmkit.registry import Registry
from slmkit.runtime import servecore as core
from slmkit.runtime import sse
from slmkit.runtime.arch import text_config

log = logging.getLogger(__name__)


class SpeculativeBackend:
    """Generates with :func:`~slmkit.collab.speculative.speculate` (target = large, draft = small).

    :meth:`stream` hands out each verified chunk of tokens as soon as the target accepts it;
    stop strings end decoding as soon as they appear (streaming or not).
    """

    def __init__(self, target, tokenizer, draft, name: str | None = None, k_max: int = 12):
        from slmkit.collab.speculative import check_same_vocab

        if isinstance(draft, torch.nn.Module):  # speculate() checks a drafter's vocabulary
            check_same_vocab(target, draft)
        self.target, self.tokenizer, self.draft, self.k_max = target, tokenizer, draft, k_max
        self._hf = from_model(target, tokenizer)  # scores (the target's log-probs)
        self.name = name or f"speculative({self._hf.name})"
        from slmkit.runtime.gguffast import exact_model

        exact_model(target)  # the verifying engine over a GGUF file's blocks (if it applies) is built now, not on the first request

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        # one sequence at a time: speculative decoding verifies one sequence's drafts per target pass
        return [self._one(p, params, i, None) for i, p in enumerate(prompts)]

    def stream(self, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
        return self._one(prompt, params, 0, on_text)

    def _one(self, prompt: Prompt, params: GenParams, i: int, on_text: OnText | None) -> Completion:
        from slmkit.backends.text import render_prompt, truncate_at_stop
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
        out, hit_stop = truncate_at_stop(tok.decode(body, skip_special_tokens=True), params.stop)
        reason = "stop" if res.finish_reason == "stop" or hit_stop else "length"
        meta = {"acceptance_rate": None if math.isnan(res.acceptance_rate) else res.acceptance_rate,
                "drafted": res.drafted, "accepted": res.accepted, "target_calls": res.target_calls}
        return Completion(out, len(res.tokens), reason, None, meta)

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return self._hf.score(texts, contexts)


class CascadeBackend:
    """Small first; escalate when the confidence of its answer is below ``threshold``.

    Confidence is one of :data:`slmkit.collab.cascade.SIGNALS`, named by ``cfg.signal``
    (default: the FrugalGPT-style mean token log-probability; ``consistency`` samples
    ``cfg.samples`` more answers; ``probe`` needs ``cfg.probe``, a trained probe file).
    :meth:`generate` answers all prompts with the small model in one call and sends every
    escalated prompt to the large one in one call. :meth:`stream` must decide first, so it
    generates the small answer whole, then streams either it (one piece) or the large model's answer.
    """

    def __init__(self, small: Backend, large: Backend | None, threshold: float, fallback: bool = True, cfg=None):
        from slmkit.collab.cascade import TRAINED_SIGNALS, CascadeConfig

        self.cfg = cfg if cfg is not None else CascadeConfig()
        if self.cfg.signal in TRAINED_SIGNALS and not (self.cfg.signal == "probe" and self.cfg.probe):
            raise SlmkitError(f"serving cannot train the {self.cfg.signal} signal on requests",
                              "use --signal logprob|consistency, or --signal probe --probe FILE")
        if self.cfg.signal == "probe":
            from slmkit.collab.probe import load_probe

            load_probe(self.cfg.probe)  # a missing or foreign file is refused before serving
        self.small, self.large, self.threshold, self.fallback = small, large, threshold, fallback
        self.name = f"cascade({small.name}->{large.name if large is not None else 'unreachable'})"

    def _first(self, prompts: Sequence[Prompt], params: GenParams) -> tuple[list[Completion], list[float]]:
        from slmkit.collab.cascade import SIGNALS

        first = self.small.generate(prompts, replace(params, logprobs=True))
        if self.cfg.signal == "logprob":
            return first, [sum(c.logprobs) / len(c.logprobs) if c.logprobs else -math.inf for c in first]
        questions = [p if isinstance(p, str) else str(p[-1].get("content", "")) if p else "" for p in prompts]
        cfg = replace(self.cfg, max_new_tokens=max(1, params.max_new_tokens))
        return first, [float(c) for c in SIGNALS.get(cfg.signal)(self.small, prompts, questions, first, cfg)]

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


def model_limits(backend) -> tuple[int | None, object | None]:
    """``(context length, tokenizer)`` of the model that reads a collaboration backend's prompts, where known.

    Speculative: the target; cascade: the shorter context of the pair (either may answer), the small
    model's tokenizer; shield: the remote's (None for an HTTP endpoint, which checks for itself).
    """
    if getattr(backend, "remote", None) is not None:
        return model_limits(backend.remote)
    if hasattr(backend, "small") and hasattr(backend, "large"):
        ctx_s, tok = model_limits(backend.small)
        ctx_l = model_limits(backend.large)[0] if backend.large is not None else None
        known = [c for c in (ctx_s, ctx_l) if c]
        return (min(known) if known else None), tok
    model = getattr(backend, "target", None)
    if model is None:
        model = getattr(backend, "model", None)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, None
    c = text_config(cfg)
    ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return (ctx if isinstance(ctx, int) and ctx > 0 else None), getattr(backend, "tokenizer", None)


def create_app(backend: Backend, name: str | None = None, api_key: str | None = None, cfg=None):
    """An OpenAI-compatible app over any Backend, on the server core shared with ``slmkit serve``.

    Validation, body limits (chunked bodies too), the bounded queue (``cfg.max_queue``, 429
    when full), the request timeout, cancellation and OpenAI-shaped errors come from
    :mod:`slmkit.runtime.servecore` (``cfg`` is its :class:`~slmkit.runtime.servecore.ServerConfig`),
    and so do ``/health``, ``/metrics`` and ``/v1/models`` (:func:`~slmkit.runtime.servecore.base_app`).
    Requests run one at a time on one worker thread (the backends share their models), each
    through :func:`~slmkit.backends.stream.generate_streaming`, so a request that is cancelled
    (client gone) or past its deadline stops at the backend's next piece of text. ``stream:
    true`` answers with server-sent events in OpenAI's chunk format; the final chunk (or the
    response) carries ``finish_reason`` and the request's ``slmkit`` metadata (:class:`CollabRoutes`).
    """
    from slmkit.runtime.omp import release_pool

    cfg = cfg or core.ServerConfig(api_key=api_key)
    if api_key and not cfg.api_key:
        cfg = replace(cfg, api_key=api_key)
    name = name or backend.name
    release_pool()  # the models were loaded on this thread; its idle OpenMP pool would slow the worker thread
    ctx, tok = model_limits(backend)
    stats = core.Stats()
    worker = core.SerialWorker(cfg.max_queue, name="slmkit-collab")
    app = core.base_app("slmkit collab", worker, cfg, stats, lambda: [name], lambda: name, "slmkit_worker_")
    app.state.worker = worker
    routes = CollabRoutes(backend, name, cfg, stats, worker, ctx, tok)
    app.post("/v1/completions")(core.handler(stats)(routes.completions))
    app.post("/v1/chat/completions")(core.handler(stats)(routes.chat))
    return app


@dataclass
class CollabRoutes:
    """The completions endpoints of :func:`create_app`: each request becomes a job on the one worker thread
    (:class:`~slmkit.runtime.servecore.SerialWorker`); every response carries the request's ``slmkit`` metadata."""

    backend: Backend
    name: str  #: the served model name
    cfg: core.ServerConfig
    stats: core.Stats
    worker: core.SerialWorker
    ctx: int | None  #: context length of the model that reads the prompts (None: unknown, not checked here)
    tok: object  #: that model's tokenizer (None: unknown)

    def params(self, s: core.Sampling, prompt: Prompt, param: str) -> GenParams:
        """The backend's GenParams: the token budget checked against the context (400 naming ``param`` when full)."""
        from slmkit.backends.text import render_prompt

        tok, ctx = self.tok, self.ctx
        n = 0
        if tok is not None and ctx is not None:
            try:
                rendered = render_prompt(tok, prompt)
            except SlmkitError as err:
                raise core.ApiError(400, str(err).splitlines()[0], param) from None
            except Exception:  # a chat template that rejects these roles or their order
                raise core.ApiError(400, "the chat template rejected these messages", param) from None
            n = len(tok(rendered, add_special_tokens=isinstance(prompt, str)).input_ids)
        mt = core.budget(s, n, ctx, self.cfg, param)
        if mt < 1:
            raise core.bad(f"the prompt fills this model's context of {ctx} tokens; shorten it", param, "context_length_exceeded")
        return GenParams(max_new_tokens=mt, temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=s.stop)

    def submit(self, params: GenParams, prompt: Prompt):
        """Queue the request on the worker: its channel, job, and the time the HTTP side waits for it at most."""
        backend = self.backend
        ch = core.Channel()
        job = core.Job(run=lambda on_text: generate_streaming(backend, prompt, params, on_text), emit=ch.emit,
                       deadline=time.monotonic() + self.cfg.request_timeout_s)
        return ch, job, core.submit(self.worker, job, self.cfg)

    def stream(self, s: core.Sampling, ch, job, until: float, chunk):
        """The SSE response; ``chunk(text, first, finish)`` shapes each event, the last one carries the metadata."""
        def finish(ev, first: bool) -> list[dict]:
            last = {**chunk("", first, ev.finish_reason), "slmkit": ev.meta}
            usage = [sse.usage_chunk(chunk("", False, None), None, ev.count or 0)] if s.include_usage else []
            return [last, *usage]

        return core.stream_response(ch, job, until, self.stats, lambda ev, first: chunk(ev.text, first, None) if ev.text else None, finish)

    async def completions(self, request: Request):
        """``POST /v1/completions``."""
        body = await core.read_json(request, self.cfg)
        s = core.sampling(body, self.cfg, None, ("max_tokens",), min_tokens=1)
        prompt = core.prompt_of(body)
        ch, job, until = self.submit(self.params(s, prompt, "prompt"), prompt)
        cid, created, name = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time()), self.name
        if s.stream:
            return self.stream(s, ch, job, until, lambda text, first, finish: sse.text_chunk(cid, created, name, text, finish))
        end = core.finished(await core.collect(request, ch, job, until))
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": end.text, "finish_reason": end.finish_reason, "logprobs": None}],
                "usage": {"completion_tokens": end.count or 0}, "slmkit": end.meta}

    async def chat(self, request: Request):
        """``POST /v1/chat/completions``."""
        body = await core.read_json(request, self.cfg)
        s = core.sampling(body, self.cfg, None, ("max_completion_tokens", "max_tokens"), min_tokens=1)
        prompt = core.messages_of(body)
        ch, job, until = self.submit(self.params(s, prompt, "messages"), prompt)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), self.name
        if s.stream:
            return self.stream(s, ch, job, until, lambda text, first, finish: sse.chat_chunk(cid, created, name, text, first, finish))
        end = core.finished(await core.collect(request, ch, job, until))
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text}, "finish_reason": end.finish_reason}],
                "usage": {"completion_tokens": end.count or 0}, "slmkit": end.meta}


@dataclass(frozen=True)
class Pairing:
    """What ``slmkit serve SMALL --large LARGE --mode MODE`` names: the two models and the options the modes use."""

    small: str  #: SMALL: a model spec (speculative mode: a drafter too, e.g. ``lookup``, ``int4``)
    large: str  #: LARGE: a model spec, or an OpenAI-compatible endpoint ``http(s)://...[#model]``
    dtype: str = "fp32"  #: dtype of the local models
    threshold: float = -1.0  #: cascade: answers whose confidence is below this escalate
    timeout: float = 60.0  #: endpoint: seconds per request
    retries: int = 2  #: endpoint: retries per request
    cascade: object = None  #: cascade: a :class:`~slmkit.collab.cascade.CascadeConfig` (None: its defaults)

    def backend(self, spec: str) -> Backend:
        """``spec`` as a Backend: a local model at ``dtype``, or an endpoint with this timeout and retries."""
        return from_spec(spec, dtype=self.dtype, timeout=self.timeout, retries=self.retries)


#: ``--mode``: how each collaboration mode builds its Backend from a :class:`Pairing`
MODES: Registry[Callable[[Pairing], Backend]] = Registry("--mode")


@MODES.register("speculative")
def speculative_pair(p: Pairing) -> Backend:
    """The large model decodes, drafted by the small one (both local: the target's logits are needed)."""
    if is_endpoint(p.large):
        raise ConfigError("speculative mode needs the large model's logits locally; --large must be a model, not a URL",
                          "use --mode cascade or shield with an endpoint")
    from slmkit.collab.drafters import resolve_draft
    from slmkit.models import load

    target, t_tok = load(p.large, dtype=p.dtype)
    draft = resolve_draft(p.small, target, t_tok, p.dtype, "the draft (SMALL)")
    name = f"speculative({p.large})" if p.small == "lookup" else f"speculative({p.small}->{p.large})"
    return SpeculativeBackend(target, t_tok, draft, name=name)


@MODES.register("cascade")
def cascade_pair(p: Pairing) -> Backend:
    """The small model answers; low-confidence answers escalate (the small one answers alone when the large is down)."""
    small = p.backend(p.small)
    try:
        large = p.backend(p.large)
    except BackendError as err:
        log.warning("large model unreachable (%s); the cascade answers from the small model", err)
        large = None
    return CascadeBackend(small, large, p.threshold, cfg=p.cascade)


@MODES.register("shield")
def shield_pair(p: Pairing) -> Backend:
    """Personal data replaced by placeholders on the device (the small model helps find it) before the large one sees it."""
    from slmkit.collab.privacy import ShieldedBackend

    small = p.backend(p.small)
    return ShieldedBackend(p.backend(p.large), small=small)


def build_backend(small_spec: str, large_spec: str, mode: str, dtype: str = "fp32", threshold: float = -1.0,
                  timeout: float = 60.0, retries: int = 2, cascade=None) -> Backend:
    """The Backend behind ``slmkit serve SMALL --large ... --mode ...`` (``cascade``: a
    :class:`~slmkit.collab.cascade.CascadeConfig` naming the confidence signal); ``mode`` names one of :data:`MODES`."""
    return MODES.get(mode)(Pairing(small_spec, large_spec, dtype, threshold, timeout, retries, cascade))

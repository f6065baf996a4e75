"""Collaboration behind the Backend Protocol, and an OpenAI-compatible app that serves it.

``slmkit serve SMALL --large URL_OR_MODEL --mode speculative|cascade|shield`` builds one of

* :class:`SpeculativeBackend`: the large (local) model decodes, drafted by the small one;
* :class:`CascadeBackend`: the small model answers, low-confidence answers escalate;
* :class:`~slmkit.collab.privacy.ShieldedBackend`: personal data is replaced by
  placeholders on the device before the large endpoint sees the request;

and serves it with :func:`create_app`: ``/health``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (non-streaming), where every response carries the
per-request metadata under ``"slmkit"`` (``escalated``, ``confidence``,
``acceptance_rate``, ``redacted``, ...).
"""


import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence

import torch

from slmkit.backends.base import Backend, Completion, GenParams, Prompt, TokenScores
from slmkit.errors import BackendError, SlmkitError

log = logging.getLogger(__name__)


class SpeculativeBackend:
    """Generates with :func:`~slmkit.collab.speculative.speculate` (target = large, draft = small)."""

    def __init__(self, target, tokenizer, draft, name: str | None = None, k_max: int = 12):
        from slmkit.backends.hf import HFBackend
        from slmkit.collab.speculative import check_same_vocab

        if not isinstance(draft, str):
            check_same_vocab(target, draft)
        self.target, self.tokenizer, self.draft, self.k_max = target, tokenizer, draft, k_max
        self._hf = HFBackend(target, tokenizer)
        self.name = name or f"speculative({self._hf.name})"

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        from slmkit.backends.hf import _truncate_at_stop, render_prompt
        from slmkit.collab.speculative import SpecConfig, speculate

        tok = self.tokenizer
        eos = {t for t in (tok.eos_token_id, self.target.generation_config.eos_token_id) if isinstance(t, int)}
        cfg = SpecConfig(max_new_tokens=params.max_new_tokens, k=min(4, self.k_max), k_max=self.k_max,
                         temperature=params.temperature, top_p=params.top_p, eos_token_ids=tuple(eos))
        out = []
        for i, p in enumerate(prompts):
            ids = tok(render_prompt(tok, p), add_special_tokens=isinstance(p, str)).input_ids or [tok.eos_token_id or 0]
            gen = torch.Generator().manual_seed((params.seed or 0) + i)
            if params.max_new_tokens == 0:
                out.append(Completion("", 0, "length"))
                continue
            res = speculate(self.target, self.draft, torch.tensor(ids), cfg, gen)
            body = [t for t in res.tokens if t not in eos]
            text, hit_stop = _truncate_at_stop(tok.decode(body, skip_special_tokens=True), params.stop)
            reason = "stop" if res.finish_reason == "stop" or hit_stop else "length"
            meta = {"acceptance_rate": None if math.isnan(res.acceptance_rate) else res.acceptance_rate,
                    "drafted": res.drafted, "accepted": res.accepted, "target_calls": res.target_calls}
            out.append(Completion(text, len(res.tokens), reason, None, meta))
        return out

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return self._hf.score(texts, contexts)


class CascadeBackend:
    """Small first; escalate when the mean token log-prob of its answer is below ``threshold``."""

    def __init__(self, small: Backend, large: Backend | None, threshold: float, fallback: bool = True):
        self.small, self.large, self.threshold, self.fallback = small, large, threshold, fallback
        self.name = f"cascade({small.name}->{large.name if large is not None else 'unreachable'})"

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        first = self.small.generate(prompts, GenParams(**{**params.__dict__, "logprobs": True}))
        out = []
        for p, c in zip(prompts, first):
            lps = c.logprobs or []
            conf = sum(lps) / len(lps) if lps else -math.inf
            meta = {"escalated": False, "confidence": conf if math.isfinite(conf) else None, "source": "small"}
            if conf < self.threshold:
                if self.large is None:
                    meta["source"] = "small (large unreachable)"
                else:
                    try:
                        c = self.large.generate([p], params)[0]
                        meta.update(escalated=True, source="large")
                    except BackendError as err:
                        if not self.fallback:
                            raise
                        meta.update(source="small (large unreachable)", large_error=str(err).splitlines()[0])
            out.append(Completion(c.text, c.tokens, c.finish_reason, c.logprobs if params.logprobs else None, {**c.meta, **meta}))
        return out

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return self.small.score(texts, contexts)


def _err(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}})


def create_app(backend: Backend, name: str | None = None, api_key: str | None = None):
    """A minimal OpenAI-compatible app over any Backend; one request at a time; metadata under ``slmkit``."""
    from fastapi import FastAPI, Request

    name = name or backend.name
    lock = threading.Lock()
    app = FastAPI(title="slmkit collab", version="1")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return _err(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "slmkit"}]}

    def _run(body: dict, prompt: Prompt):
        try:
            stop = body.get("stop") or ()
            params = GenParams(
                max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
                temperature=float(1.0 if body.get("temperature") is None else body["temperature"]),
                top_p=float(1.0 if body.get("top_p") is None else body["top_p"]),
                seed=body.get("seed"), stop=(stop,) if isinstance(stop, str) else tuple(stop),
            )
        except (SlmkitError, ValueError, TypeError) as err:
            return None, _err(400, str(err).splitlines()[0])
        try:
            with lock:
                return backend.generate([prompt], params)[0], None
        except BackendError as err:
            return None, _err(502, str(err).splitlines()[0], "upstream_error")
        except SlmkitError as err:
            return None, _err(400, str(err).splitlines()[0])

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
        c, bad = _run(body, body["prompt"])
        if bad is not None:
            return bad
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()), "model": name,
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
        c, bad = _run(body, [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in msgs])
        if bad is not None:
            return bad
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()), "model": name,
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
        from slmkit.collab.speculative import check_same_tokenizer
        from slmkit.models import load

        target, t_tok = load(large_spec, dtype=dtype)
        if small_spec == "lookup":
            return SpeculativeBackend(target, t_tok, "lookup", name=f"speculative({large_spec})")
        if small_spec.startswith("layers:"):
            from slmkit.collab.speculative import layer_draft

            n = small_spec.split(":", 1)[1]
            if not n.isdigit():
                raise ConfigError(f"SMALL layers:N needs an integer N, got {small_spec!r}")
            return SpeculativeBackend(target, t_tok, layer_draft(target, int(n)), name=f"speculative({small_spec}->{large_spec})")
        draft, d_tok = load(small_spec, dtype=dtype)
        check_same_tokenizer(t_tok, d_tok, "the draft (SMALL) and the target (--large)")
        return SpeculativeBackend(target, t_tok, draft, name=f"speculative({small_spec}->{large_spec})")
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

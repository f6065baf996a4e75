"""What a request to slmkit's servers may say: strict JSON and the OpenAI request fields (issue 17).

Part of the server core (:mod:`slmkit.runtime.servecore` re-exports these names):
:func:`parse_json` refuses ``NaN``/``Infinity`` and nesting past :data:`JSON_MAX_DEPTH`;
:func:`sampling` checks the fields every completion request shares (types, ranges, finite
numbers, a 64-bit unsigned ``seed``, ``max_tokens`` kept as given or refused but never
replaced, ``stream_options`` before any job exists); :func:`prompt_of` and
:func:`messages_of` the prompt. Every refusal is an :class:`ApiError`, which the core
renders in OpenAI's error shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmkit.runtime.servecore import ServerConfig

SEED_MAX = 2**64 - 1  #: seeds are 64-bit unsigned (what torch.Generator.manual_seed takes)
MAX_TOKENS_MAX = 2**31 - 1  #: max_tokens bound where a server does not know its model's context
ROLES = ("system", "developer", "user", "assistant", "tool")
GREEDY_BELOW = 1e-5  #: smaller temperatures decode greedily (as vLLM does): logits / 1e-300 overflow
JSON_MAX_DEPTH = 64  #: nesting deeper than this is refused (no request field needs more than 4)
#: worker error codes (Event.finish_reason of an "error" event) -> HTTP status and OpenAI error type
ERROR_STATUS = {"invalid": 400, "timeout": 504, "upstream": 502, "cancelled": 499}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              413: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
              502: "upstream_error", 504: "timeout_error"}


class ApiError(Exception):
    """A request that fails with ``status``; rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def response(self):
        return error_response(self.status, self.message, self.param, self.kind, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None):
    """A JSON response in OpenAI's error shape (:func:`error_body`); ``kind`` defaults from the status."""
    from fastapi.responses import JSONResponse

    kind = kind or ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(status_code=status, content=error_body(message, kind, param, code))


def brief(v, n: int = 60) -> str:
    """``repr(v)`` cut to ``n`` characters (request values quoted in error messages)."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


# --------------------------------------------------------------------------- the body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _depth_ok(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object: strict (no NaN/Infinity), nesting at most JSON_MAX_DEPTH."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        why = f": {err}" if "not allowed" in str(err) else ""
        raise ApiError(400, f"request body is not valid JSON{why}") from None
    except RecursionError:
        raise ApiError(400, f"request body is nested too deeply (at most {JSON_MAX_DEPTH} levels)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if not _depth_ok(body, JSON_MAX_DEPTH):
        raise ApiError(400, f"request body is nested too deeply (at most {JSON_MAX_DEPTH} levels)")
    return body


# --------------------------------------------------------------------------- validation


def bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code=code)


def number(body: dict, key: str, default: float | None, lo: float | None = None, hi: float | None = None) -> float | None:
    """A finite number in [lo, hi], or ``default`` when absent/null."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{key} must be a number, got {brief(v)}", key)
    try:
        v = float(v)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{key} must be a finite number in [{lo}, {hi}], got {brief(body.get(key))}", key)
    return v


def integer(body: dict, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    """An integer in [lo, hi] (a float with no fraction counts), or ``default`` when absent/null."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer, got {brief(v)}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{key} must be an integer in [{lo}, {hi}], got {brief(v)}", key)
    return v


def flag(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{key} must be true or false, got {brief(v)}", key)
    return v


def text(v, param: str) -> str:
    """``v`` as a string that can be encoded (no unpaired surrogates)."""
    if not isinstance(v, str):
        raise bad(f"{param} must be a string, got {brief(v)}", param)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} holds an unpaired surrogate (\\ud800-\\udfff): not valid text", param) from None
    return v


@dataclass(frozen=True)
class Sampling:
    """The fields every completion request shares, validated."""

    model: str | None  #: the requested model (None: the server's default)
    max_tokens: int | None  #: None when the request gives none
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  #: stream_options.include_usage


def sampling(body: dict, cfg: ServerConfig, models: Collection[str] | None, max_tokens_keys: tuple[str, ...] = ("max_tokens",),
             min_tokens: int = 0) -> Sampling:
    """Validate the shared fields of ``body``; ``models``: the names served (None: any string is accepted)."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise bad(f"model must be a string, got {brief(model)}", "model")
        if models is not None and model not in models:
            names = ", ".join(map(repr, models))
            raise ApiError(404, f"model {brief(model)} does not exist; this server serves {names}", "model", code="model_not_found")
    if integer(body, "n", 1) != 1:
        raise bad("only n=1 is supported", "n")
    mt = None
    for k in max_tokens_keys:
        if body.get(k) is not None:
            mt = integer(body, k, None, min_tokens, MAX_TOKENS_MAX)
            break
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > cfg.max_stop:
        raise bad(f"stop must be a string or a list of at most {cfg.max_stop} strings", "stop")
    stop = tuple(text(s, "stop") for s in stop)
    stream = flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad(f"stream_options must be an object, got {brief(opts)}", "stream_options")
    include_usage = flag(opts or {}, "include_usage")
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    return Sampling(
        model=model, max_tokens=mt,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=integer(body, "seed", None, 0, SEED_MAX),
        stop=tuple(s for s in stop if s), stream=stream, include_usage=stream and include_usage,
    )


def budget(s: Sampling, prompt_tokens: int, context: int | None, cfg: ServerConfig, param: str) -> int:
    """``max_tokens`` for this request: the requested one, bounded by the context, else the default (fit to the context)."""
    if context is None:
        return s.max_tokens if s.max_tokens is not None else cfg.default_max_tokens
    mt = s.max_tokens if s.max_tokens is not None else min(cfg.default_max_tokens, max(context - prompt_tokens, 0))
    if prompt_tokens + mt > context:
        raise bad(f"this model's context is {context} tokens, but the request needs {prompt_tokens} prompt + {mt} "
                  "completion tokens; shorten the prompt or lower max_tokens", param, "context_length_exceeded")
    return mt


def prompt_of(body: dict, vocab: int | None = None) -> str | list[int]:
    """``prompt``: a string, a list of one string, or (with ``vocab``) one list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and not isinstance(p[0], int):
        p = p[0]
    if isinstance(p, str):
        return text(p, "prompt")
    if vocab is not None and isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if max(p) >= vocab or min(p) < 0:
            raise bad("prompt token ids out of the vocabulary", "prompt")
        return list(p)
    raise bad("prompt must be a string" + (" (or one list of token ids)" if vocab is not None else ""), "prompt")


def messages_of(body: dict) -> list[dict]:
    """``messages`` as ``[{role, content}]`` with string content (text parts are joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("messages must be a non-empty list of {role, content} objects with string content", "messages")
        if m["role"] not in ROLES:
            raise bad(f"message role must be one of {', '.join(ROLES)}, got {brief(m['role'])}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                raise bad("message content parts must be {type: text, text: string}", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad("messages must be a non-empty list of {role, content} objects with string content", "messages")
        out.append({"role": m["role"], "content": text(content, "messages")})
    return out


def template_error(err: BaseException) -> bool:
    """Whether ``err`` is a chat template refusing the messages (jinja2's TemplateError)."""
    return any(c.__module__.startswith("jinja2") and c.__name__ == "TemplateError" for c in type(err).__mro__)

"""OpenAI-compatible HTTP server over a local :class:`~slmkit.backends.HFBackend`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``
(including ``echo`` + ``logprobs`` with ``max_tokens=0`` for prompt scoring, as
vLLM does) and ``POST /v1/chat/completions``. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with 4xx codes for bad
requests. Requests are served one at a time (a lock around the model).
Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from slmkit.backends.base import GenParams
from slmkit.backends.hf import HFBackend
from slmkit.errors import SlmkitError


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}}
    )


def _params(body: dict) -> GenParams:
    stop = body.get("stop") or ()
    return GenParams(
        max_new_tokens=int(body.get("max_tokens", body.get("max_completion_tokens", 16)) or 0),
        temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
        top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        logprobs=bool(body.get("logprobs")),
    )


def create_app(backend: HFBackend, model_name: str | None = None, api_key: str | None = None):
    name = model_name or backend.name
    lock = threading.Lock()
    app = FastAPI(title="slmkit", version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ARG001
        return _error(400, f"invalid request: {exc.errors()[:1]}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "slmkit"}]}

    async def _body(request: Request) -> dict | Any:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if body.get("model") not in (None, name):
            return _error(404, f"model {body.get('model')!r} does not exist; this server serves {name!r}", "model", "not_found_error")
        try:
            body["_params"] = _params(body)
        except (SlmkitError, ValueError, TypeError) as err:
            return _error(400, str(err).splitlines()[0])
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        if not isinstance(body, dict):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return _error(400, "prompt must be a string", "prompt")
        params: GenParams = body["_params"]
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
        with lock:
            if body.get("echo"):
                toks, lps = backend.prompt_logprobs(prompt)
                offs, pos = [], 0
                for t in toks:
                    offs.append(pos)
                    pos += len(backend.tokenizer.convert_tokens_to_string([t]))
                # the first token has no history: OpenAI/vLLM report None for it
                choice["logprobs"] = {"tokens": toks, "token_logprobs": lps, "text_offset": offs, "top_logprobs": None}
                choice["text"] = prompt
                usage_prompt = len(toks)
            else:
                usage_prompt = len(backend.tokenizer(prompt).input_ids)
            gen_tokens = 0
            if params.max_new_tokens > 0:
                c = backend.generate([prompt], params)[0]
                choice["text"] += c.text
                choice["finish_reason"] = c.finish_reason
                gen_tokens = c.tokens
                if params.logprobs and not body.get("echo"):
                    choice["logprobs"] = {"token_logprobs": c.logprobs}
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": gen_tokens, "total_tokens": usage_prompt + gen_tokens},
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request)
        if not isinstance(body, dict):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "content" in m for m in messages):
            return _error(400, "messages must be a non-empty list of {role, content} objects", "messages")
        params: GenParams = body["_params"]
        try:
            with lock:
                c = backend.generate([messages], params)[0]
        except SlmkitError as err:
            return _error(400, str(err).splitlines()[0])
        lp = {"content": [{"token": "", "logprob": v} for v in c.logprobs]} if c.logprobs else None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": lp}],
            "usage": {"completion_tokens": c.tokens},
        }

    return app


def serve(backend: HFBackend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(backend, api_key=api_key), host=host, port=port, log_level="info")

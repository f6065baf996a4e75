"""OpenAI-style server-sent events (``stream: true``), shared by ``slmkit serve`` and the collab app.

A stream is ``data: {chunk}\\n\\n`` events, the last chunk carrying ``finish_reason``,
then ``data: [DONE]\\n\\n``. Completions chunks put the text in ``choices[0].text``;
chat chunks in ``choices[0].delta.content`` (the first delta also has the role).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

DONE = "data: [DONE]\n\n"


def event(obj: dict) -> str:
    """One SSE event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


def error_event(message: str, kind: str = "server_error", code: str | None = None) -> str:
    """An error inside a stream (the status line has already gone out), in OpenAI's error shape."""
    return event({"error": {"message": message, "type": kind, "param": None, "code": code}})


def text_chunk(cid: str, created: int, model: str, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
    """A ``/v1/completions`` chunk."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def chat_chunk(cid: str, created: int, model: str, text: str, first: bool, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    """A ``/v1/chat/completions`` chunk; ``first`` adds the assistant role to the delta."""
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(chunk: dict, prompt_tokens: int | None, completion_tokens: int) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    usage = {"completion_tokens": completion_tokens}
    if prompt_tokens is not None:
        usage.update(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens + completion_tokens)
    return {**chunk, "choices": [], "usage": usage}


def response(events: AsyncIterator[str]):
    """A ``text/event-stream`` response over ``events`` (already formatted)."""
    from fastapi.responses import StreamingResponse

    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

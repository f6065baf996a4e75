"""Backend over any OpenAI-compatible HTTP endpoint (vLLM, llama.cpp server, cloud APIs, ``slmkit serve``).

Uses ``/v1/completions`` for raw-text prompts and scoring (``echo`` with
``logprobs``, as vLLM supports) and ``/v1/chat/completions`` for chats.
Connection errors, timeouts, 429 and 5xx answers are retried with exponential
backoff; other 4xx answers fail at once with the server's message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import httpx

from slmkit.backends.base import Completion, GenParams, Prompt, TokenScores
from slmkit.backends.stream import OnText
from slmkit.errors import BackendError

log = logging.getLogger(__name__)


class OpenAIBackend:
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.retries = retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.model = model or self._first_model()
        self.name = f"{self.model}@{self.base_url}"

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, json: dict | None = None) -> dict:
        url = self.base_url + path
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, url, json=json)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                last = f"{type(err).__name__}: {err}"
                log.warning("%s %s failed (%s), try %d/%d", method, url, last, attempt + 1, self.retries + 1)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                try:
                    msg = r.json().get("error", {}).get("message") or r.text
                except ValueError:
                    msg = r.text
                raise BackendError(f"{url} rejected the request (HTTP {r.status_code}): {str(msg)[:300]}")
            try:
                return r.json()
            except ValueError:
                raise BackendError(f"{url} answered with something that is not JSON: {r.text[:200]!r}") from None
        raise BackendError(
            f"cannot get an answer from {url} after {self.retries + 1} tries ({last})",
            "check that the server is running and the URL is right",
        )

    def _first_model(self) -> str:
        data = self._request("GET", "/models").get("data") or []
        if not data:
            raise BackendError(f"{self.base_url}/models lists no model", "pass model= explicitly")
        return data[0]["id"]

    def _sampling(self, params: GenParams, i: int = 0) -> dict:
        body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
        seed = params.seed_for(i)
        if seed is not None:
            body["seed"] = seed
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        out = []
        for i, prompt in enumerate(prompts):
            body = {"model": self.model, **self._sampling(params, i)}
            if isinstance(prompt, str):
                if params.logprobs:
                    body["logprobs"] = 1
                choice = self._request("POST", "/completions", {**body, "prompt": prompt})["choices"][0]
                text = choice.get("text", "")
                lps = (choice.get("logprobs") or {}).get("token_logprobs")
            else:
                if params.logprobs:
                    body["logprobs"] = True
                choice = self._request("POST", "/chat/completions", {**body, "messages": prompt})["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                content = (choice.get("logprobs") or {}).get("content")
                lps = [c["logprob"] for c in content] if content else None
            n = len(lps) if lps is not None else None
            out.append(Completion(text, n if n is not None else -1, choice.get("finish_reason") or "stop", lps))
        return out

    def stream(self, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
        """One completion with ``stream: true``: ``on_text`` gets each piece as the server sends it
        (see :mod:`slmkit.backends.stream`); returning True closes the connection. Connection
        failures are retried only while no text has arrived yet."""
        chat = not isinstance(prompt, str)
        body = {"model": self.model, **self._sampling(params), "stream": True, **({"messages": prompt} if chat else {"prompt": prompt})}
        url = self.base_url + ("/chat/completions" if chat else "/completions")
        pieces: list[str] = []
        finish, last = "stop", ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._client.stream("POST", url, json=body) as r:
                    if r.status_code == 429 or r.status_code >= 500:
                        last = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"
                        continue
                    if r.status_code >= 400:
                        raise BackendError(f"{url} rejected the request (HTTP {r.status_code}): {r.read().decode(errors='replace')[:300]}")
                    for line in r.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        try:
                            obj = json.loads(data)
                        except ValueError:
                            raise BackendError(f"{url} streamed something that is not JSON: {data[:200]!r}") from None
                        if "error" in obj:
                            raise BackendError(f"{url} failed while streaming: {str((obj['error'] or {}).get('message'))[:300]}")
                        for ch in obj.get("choices") or []:
                            piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                            finish = ch.get("finish_reason") or finish
                            if piece:
                                pieces.append(piece)
                                if on_text(piece):
                                    return Completion("".join(pieces), -1, "stop")
                return Completion("".join(pieces), -1, finish)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                if pieces:
                    raise BackendError(f"the stream from {url} broke off: {type(err).__name__}: {err}") from None
                last = f"{type(err).__name__}: {err}"
                log.warning("POST %s failed (%s), try %d/%d", url, last, attempt + 1, self.retries + 1)
        raise BackendError(
            f"cannot get an answer from {url} after {self.retries + 1} tries ({last})",
            "check that the server is running and the URL is right",
        )

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        out = []
        for i, text in enumerate(texts):
            ctx = "" if contexts is None else contexts[i]
            body = {
                "model": self.model,
                "prompt": ctx + text,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 1,
                "temperature": 0.0,
            }
            lp = (self._request("POST", "/completions", body)["choices"][0].get("logprobs")) or {}
            toks, lps, offs = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
            if toks is None or lps is None or offs is None:
                raise BackendError(
                    f"{self.base_url} does not return prompt logprobs (echo + logprobs)",
                    "scoring needs a server that supports echo, e.g. vLLM or slmkit serve",
                )
            keep = [j for j, o in enumerate(offs) if o >= len(ctx) and lps[j] is not None]
            out.append(TokenScores([toks[j] for j in keep], [float(lps[j]) for j in keep]))
        return out

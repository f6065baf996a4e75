"""Backend over any OpenAI-compatible HTTP endpoint (vLLM, llama.cpp server, cloud APIs, ``slmkit serve``).

Uses ``/v1/completions`` for raw-text prompts and scoring (``echo`` with
``logprobs``, as vLLM supports) and ``/v1/chat/completions`` for chats.
Connection errors, timeouts, 429 and 5xx answers are retried with exponential
backoff; other 4xx answers fail at once with the server's message.

Concurrency: ``generate`` and ``score`` keep up to ``concurrency`` requests in
flight (a bounded thread pool over one pooled ``httpx.Client``), so a batching
server (vLLM, ``slmkit serve``) decodes them together. Results come back in input
order, and prompt ``i`` of a call always carries the seed ``params.seed_for(i)``,
so the texts do not depend on the concurrency. A prompt that still fails after
its retries does not stop the others: the call finishes them all, then raises
:class:`~slmkit.backends.base.PartialFailure` holding every result that came back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx

from slmkit.backends.base import Completion, GenParams, PartialFailure, Prompt, TokenScores
from slmkit.backends.stream import OnText
from slmkit.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _Unreachable(BackendError):
    """No answer at all (connection errors or timeouts on every try): later prompts are not sent."""


class OpenAIBackend:
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 1,
    ):
        if concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency  #: requests in flight at once in generate / score
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max(concurrency, 10), max_keepalive_connections=max(concurrency, 10))
        self._client = httpx.Client(timeout=timeout, headers=headers, limits=limits)  # thread-safe, pooled
        self.model = model or self._first_model()
        self.name = f"{self.model}@{self.base_url}"

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, json: dict | None = None) -> dict:
        url = self.base_url + path
        last: str = ""
        transport_only = True
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, url, json=json)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                last = f"{type(err).__name__}: {err}"
                log.warning("%s %s failed (%s), try %d/%d", method, url, last, attempt + 1, self.retries + 1)
                continue
            transport_only = False
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
        raise (_Unreachable if transport_only else BackendError)(
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

    def _map(self, fn: Callable[[int, T], R], items: Sequence[T]) -> list[R]:
        """``[fn(i, item) ...]`` in input order, ``concurrency`` calls at a time; every item is tried
        even when some fail, and failures (after their own retries) raise one :class:`PartialFailure`."""
        results: list = [None] * len(items)
        failed: dict[int, BackendError] = {}
        down: list[BackendError] = []  # set once the endpoint does not answer at all: the rest are not sent

        def run(i: int) -> None:
            if down:
                failed[i] = BackendError(f"not sent ({down[0].problem})", down[0].hint)
                return
            try:
                results[i] = fn(i, items[i])
            except _Unreachable as err:
                down.append(err)
                failed[i] = err
            except BackendError as err:
                failed[i] = err

        if self.concurrency == 1 or len(items) <= 1:
            for i in range(len(items)):
                run(i)
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)), thread_name_prefix="slmkit-http") as pool:
                list(pool.map(run, range(len(items))))  # re-raises anything that is not a BackendError
        if failed:
            raise PartialFailure(results, failed)
        return results

    def _generate_one(self, i: int, prompt: Prompt, params: GenParams) -> Completion:
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
        return Completion(text, n if n is not None else -1, choice.get("finish_reason") or "stop", lps)

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        """One request per prompt, ``concurrency`` at a time; prompt ``i`` is sampled with ``params.seed_for(i)``."""
        return self._map(lambda i, p: self._generate_one(i, p, params), list(prompts))

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

    def _score_one(self, text: str, ctx: str) -> TokenScores:
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
        return TokenScores([toks[j] for j in keep], [float(lps[j]) for j in keep])

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        """One echo request per text, ``concurrency`` at a time, results in input order."""
        pairs = [(t, "" if contexts is None else contexts[i]) for i, t in enumerate(texts)]
        return self._map(lambda i, pair: self._score_one(*pair), pairs)

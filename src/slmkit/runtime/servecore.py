"""The HTTP core under ``slmkit serve`` and the collaboration modes (``serve --large ... --mode ...``).

Both servers (:mod:`slmkit.runtime.server` over the continuous-batching engine,
:mod:`slmkit.collab.serving` over a Backend) take from here:

* **errors** in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
  (:class:`ApiError`), for every status, 404/405 of unknown routes included; a 500 says
  "internal error" and never echoes exception text (the server log has the traceback);
* **the app** (:func:`base_app`): the guard, OpenAI-shaped framework errors, ``/health``, ``/metrics`` and
  ``/v1/models`` over the server's runner (engine or :class:`SerialWorker`); :func:`submit` queues a job (429 when full);
* **the guard** (:class:`Guard`, plain ASGI): the API key on ``/v1`` and ``/metrics``,
  compared in constant time (``hmac.compare_digest``); a declared ``Content-Length`` over
  the limit refused before anything is read; responses counted by status;
* **the body** (:func:`read_json`): read piece by piece and abandoned at the limit (413),
  so a chunked body of any size costs at most the limit; then parsed as strict JSON
  (``NaN``/``Infinity`` refused, too deep nesting a 400 rather than a RecursionError);
* **validation** of what both accept (:mod:`slmkit.runtime.servecheck`, re-exported here:
  :func:`sampling`, :func:`prompt_of`, :func:`messages_of`): types, ranges, finite numbers,
  a ``seed`` that fits 64 bits unsigned, ``max_tokens`` 0 kept as 0 (or refused where a
  server needs >= 1, never replaced), ``stream_options`` checked before any job exists,
  the context length;
* **the request life cycle**: a :class:`Channel` carries a worker thread's events into the
  event loop; :func:`collect` (one JSON response) and :func:`stream_response` (a stream) wait at most
  until the request's deadline plus a grace, cancel the job when the client leaves, and a
  stream that fails mid-way ends with an error event and ``[DONE]`` — a client never waits
  for ever;
* **the queue** for backends that generate one request at a time (:class:`SerialWorker`):
  bounded (429 when full), one thread, deadline and cancellation checked between pieces;
* **idle connections** (:func:`run`): uvicorn with its h11 protocol plus a header deadline, so
  a connection that sends no complete request (no bytes at all, or headers trickled in, as a
  slowloris client does) within ``idle_timeout_s`` of opening or of its previous response is
  closed (uvicorn alone closes only kept-alive connections, and only until a first byte arrives).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from slmkit.errors import BackendError, ConfigError, SlmkitError
from slmkit.runtime import sse as _sse
from slmkit.runtime.engine import Event
from slmkit.runtime.servecheck import (  # noqa: F401  (re-exported: the core's request checks)
    ERROR_STATUS, ERROR_TYPE, GREEDY_BELOW, JSON_MAX_DEPTH, MAX_TOKENS_MAX, ROLES, SEED_MAX, ApiError, Sampling, brief, bad,
    budget, error_body, error_response, flag, integer, messages_of, number, parse_json, prompt_of, sampling, template_error,
    text,
)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2  #: how often a non-streamed request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  #: require ``Authorization: Bearer KEY`` on /v1 and /metrics
    max_body_bytes: int = 1_000_000  #: larger request bodies get HTTP 413 (chunked ones too)
    request_timeout_s: float = 300.0  #: a request running longer ends with a timeout (504 or an error event)
    max_stop: int = 16  #: stop strings per request at most
    default_max_tokens: int = 16  #: when the request gives none (OpenAI's completions default)
    max_queue: int = 256  #: waiting requests at most where the server owns the queue (collaboration modes)
    grace_s: float = 10.0  #: how long past its deadline a request's worker may take to answer before the HTTP side gives up
    #: a connection that has not sent a complete request's headers this many seconds after it opened
    #: (or after its previous response) is closed; also uvicorn's keep-alive timeout
    idle_timeout_s: float = 30.0

    def __post_init__(self):
        for k in ("max_body_bytes", "max_stop", "max_queue"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("request_timeout_s", "idle_timeout_s"):
            if not getattr(self, k) > 0 or not math.isfinite(getattr(self, k)):
                raise ConfigError(f"{k} must be a positive number of seconds, got {getattr(self, k)}")


# --------------------------------------------------------------------------- errors


def error_of(ev: Event) -> ApiError:
    """The ApiError for a worker's error event (its finish_reason is the code: invalid, timeout, upstream)."""
    status = ERROR_STATUS.get(ev.finish_reason or "", 500)
    return ApiError(status, ev.text if status != 500 else "internal error", code=ev.finish_reason if status != 500 else None)


# --------------------------------------------------------------------------- guard, counts, handlers


class Stats:
    """Responses by status and request latencies, for ``/metrics``."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=2000)

    def metrics(self, gauges: dict[str, float]) -> str:
        lat = sorted(self.latencies)
        q = (lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else 0.0)
        lines = [
            *(f"{k} {v}" for k, v in gauges.items()),
            *(f'slmkit_responses_total{{status="{k}"}} {v}' for k, v in sorted(self.counts.items())),
            f'slmkit_request_seconds{{quantile="0.5"}} {q(0.5):.4f}',
            f'slmkit_request_seconds{{quantile="0.95"}} {q(0.95):.4f}',
        ]
        return "\n".join(lines) + "\n"


class Guard:
    """Plain ASGI middleware: API key, declared body size, status counts, and a last-resort 500.

    A plain middleware (not Starlette's ``BaseHTTPMiddleware``) so that streams and client
    disconnects pass through untouched.
    """

    def __init__(self, app, cfg: ServerConfig, stats: Stats):
        self.app, self.cfg, self.stats = app, cfg, stats
        self._want = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None

    async def _send_error(self, send, status: int, message: str, kind: str | None = None, code: str | None = None) -> None:
        kind = kind or ERROR_TYPE.get(status, "server_error")
        body = json.dumps(error_body(message, kind, None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                self.stats.counts[str(msg["status"])] += 1
            await send(msg)

        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self._want is not None and (path.startswith("/v1") or path.startswith("/metrics")):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self._want):  # constant time
                return await self._send_error(counted, 401, "invalid or missing API key", "authentication_error", "invalid_api_key")
        size = headers.get(b"content-length")
        if size is not None:
            if not size.strip().isdigit():
                return await self._send_error(counted, 400, "Content-Length is not a number")
            if int(size) > self.cfg.max_body_bytes:
                return await self._send_error(counted, 413, f"request body of {int(size)} bytes exceeds the limit of {self.cfg.max_body_bytes}")
        try:
            await self.app(scope, receive, counted)
        except Exception:  # never a bare 500 page, never the exception's text; the server stays up
            log.exception("unhandled error serving %s", path)
            if not started:
                await self._send_error(counted, 500, "internal error", "server_error")


def install(app, cfg: ServerConfig, stats: Stats) -> None:
    """The guard, and OpenAI-shaped errors for the framework's own 4xx (unknown route, wrong method)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app.add_middleware(Guard, cfg=cfg, stats=stats)

    async def http_error(_request, exc: HTTPException):
        resp = error_response(exc.status_code, str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    async def invalid(_request, exc: RequestValidationError):
        return error_response(400, "invalid request")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


def handler(stats: Stats):
    """Decorator for an endpoint ``async fn(request)``: ApiError / SlmkitError become OpenAI-shaped 4xx,
    anything else a 500 that says only "internal error"; non-streamed latencies are recorded."""
    from fastapi.responses import StreamingResponse

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(request):
            t0 = time.perf_counter()
            try:
                resp = await fn(request)
            except ApiError as e:
                return e.response()
            except BackendError as e:
                return error_response(502, str(e).splitlines()[0], kind="upstream_error")
            except SlmkitError as e:
                return error_response(400, str(e).splitlines()[0])
            except Exception:
                log.exception("request failed")
                return error_response(500, "internal error", kind="server_error")
            if not isinstance(resp, StreamingResponse):
                stats.latencies.append(time.perf_counter() - t0)
            return resp

        return wrapper

    return deco


# --------------------------------------------------------------------------- the app both servers start from


def base_app(title: str, runner, cfg: ServerConfig, stats: Stats, names: Callable[[], Iterable[str]],
             default: Callable[[], str], counters: str):
    """A FastAPI app with :func:`install`'s guard and errors and the routes both servers share: ``/health``,
    ``/metrics`` (Prometheus text) and ``/v1/models``.

    ``runner`` (the engine or a :class:`SerialWorker`) gives ``active``, ``queued``, ``stats`` (its counters,
    named ``counters + key`` in /metrics) and ``close()``, called when the app shuts down; ``names()`` lists
    the served model names and ``default()`` the one ``/health`` reports.
    """
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        runner.close()

    app = FastAPI(title=title, version="1", lifespan=lifespan)
    install(app, cfg, stats)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": default(), "active": runner.active, "queued": runner.queued}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        gauges = {"slmkit_requests_active": runner.active, "slmkit_requests_queued": runner.queued,
                  **{f"{counters}{k}": v for k, v in runner.stats.items()}}
        return PlainTextResponse(stats.metrics(gauges))

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmkit"} for n in names()]}

    return app


def submit(runner, job, cfg: ServerConfig) -> float:
    """Queue ``job`` on ``runner`` (429 when its queue is full); the time the HTTP side waits for it at most."""
    try:
        runner.submit(job)
    except queue.Full:
        raise ApiError(429, "the server's queue is full; retry later") from None
    return job.deadline + cfg.grace_s


# --------------------------------------------------------------------------- the body


async def read_json(request, cfg: ServerConfig) -> dict:
    """The request's JSON object, read piece by piece: past ``max_body_bytes`` reading stops with 413."""
    from starlette.requests import ClientDisconnect

    pieces, n = [], 0
    try:
        async for piece in request.stream():
            n += len(piece)
            if n > cfg.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
            pieces.append(piece)
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the body ended") from None
    return parse_json(b"".join(pieces))


# --------------------------------------------------------------------------- request life cycle


class Channel:
    """Events from a worker thread into this event loop (``emit`` is thread-safe)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, ev)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    async def next(self, deadline: float) -> Event | None:
        """The next event, or None once ``deadline`` (time.monotonic) has passed."""
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        try:
            return await asyncio.wait_for(self.q.get(), timeout=wait)
        except asyncio.TimeoutError:
            return None


def _timeout_event() -> Event:
    return Event("error", text="request timed out", finish_reason="timeout")


async def collect(request, ch: Channel, job, deadline: float) -> list[Event]:
    """Every event of a non-streamed job up to its end ("done" or "error"). A client that disconnects
    cancels the job; a worker silent past ``deadline`` ends it with a timeout."""
    events: list[Event] = []
    check_at = time.monotonic() + DISCONNECT_POLL_S
    while True:
        ev = await ch.next(min(deadline, check_at))
        if ev is not None:
            events.append(ev)
            if ev.kind in ("done", "error"):
                return events
        now = time.monotonic()
        if now >= deadline:
            job.cancel()
            return [*events, _timeout_event()]
        if now >= check_at:  # every DISCONNECT_POLL_S, busy or not (a decoding job sends events all the time)
            check_at = now + DISCONNECT_POLL_S
            if await request.is_disconnected():
                job.cancel()
                return [*events, Event("error", text="client disconnected", finish_reason="cancelled")]


def finished(events: list[Event]) -> Event:
    """The last event of a collected job; raises its ApiError when it failed."""
    end = events[-1]
    if end.kind == "error":
        raise error_of(end)
    return end


def stream_response(ch: Channel, job, deadline: float, stats: Stats, chunk: Callable[[Event, bool], dict | None],
        finish: Callable[[Event, bool], list[dict]]):
    """A server-sent event stream of ``job``'s events.

    ``chunk(ev, first)`` shapes a delta (None: nothing to send), ``finish(ev, first)`` the chunks
    of the end. A failure (worker error, a silent worker past ``deadline``, a bug while shaping)
    sends one error event in OpenAI's shape and ``[DONE]``; the job is cancelled when the stream
    ends for any reason (the client going away included).
    """
    t0 = time.perf_counter()

    async def gen():
        outcome = "stream_aborted"
        first = True
        try:
            while True:
                ev = await ch.next(deadline)
                if ev is None:
                    ev = _timeout_event()
                if ev.kind == "error":
                    err = error_of(ev)
                    outcome = f"stream_error_{err.status}"
                    yield sse_error(err)
                    break
                if ev.kind == "delta":
                    c = chunk(ev, first)
                    if c is not None:
                        yield _sse.event(c)
                        first = False
                    continue
                for c in finish(ev, first):
                    yield _sse.event(c)
                outcome = "stream_done"
                break
            yield _sse.DONE
        except Exception:  # a bug while shaping chunks: the client still gets an end
            log.exception("stream failed")
            outcome = "stream_error_500"
            yield sse_error(ApiError(500, "internal error"))
            yield _sse.DONE
        finally:  # finished, failed, or the client went away (the generator is closed)
            job.cancel()
            stats.counts[outcome] += 1
            stats.latencies.append(time.perf_counter() - t0)

    return _sse.response(gen())


def sse_error(err: ApiError) -> str:
    return _sse.error_event(err.message, kind=err.kind, code=err.code)


# --------------------------------------------------------------------------- one-at-a-time worker


@dataclass
class Job:
    """One request for a :class:`SerialWorker`: ``run(on_text)`` generates (``on_text(piece) -> stop?``)
    and returns a Completion-like result (``text``, ``tokens``, ``finish_reason``, ``meta``)."""

    run: Callable[[Callable[[str], bool]], object]
    emit: Callable[[Event], None]
    deadline: float = math.inf
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class SerialWorker:
    """A bounded queue and one thread that runs :class:`Job` s one at a time.

    Each job's pieces go out as "delta" events, its end as "done" (with ``text``, ``meta``
    and the token count in ``count``) or "error" (finish_reason ``invalid``, ``upstream``,
    ``timeout``, or None for an internal failure, whose text stays in the log). Between
    pieces the job stops when cancelled or past its deadline. ``after_job`` runs on the
    worker thread after each job.
    """

    def __init__(self, max_queue: int = 256, after_job: Callable[[], object] | None = None, name: str = "slmkit-worker"):
        self._q: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._after = after_job
        self._busy = 0
        self._stop = threading.Event()
        self.stats = {"requests_done": 0, "requests_cancelled": 0, "requests_timed_out": 0, "errors": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``queue.Full`` when the queue is full."""
        self._q.put_nowait(job)

    @property
    def queued(self) -> int:
        return self._q.qsize()

    @property
    def active(self) -> int:
        return self._busy

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            self._busy = 1
            try:
                self._one(job)
            finally:
                self._busy = 0
                if self._after is not None:
                    try:
                        self._after()
                    except Exception:
                        log.exception("after_job failed")

    def _one(self, job: Job) -> None:
        if job.cancelled:
            self.stats["requests_cancelled"] += 1
            return job.emit(Event("done", finish_reason="cancelled"))
        if time.monotonic() > job.deadline:
            self.stats["requests_timed_out"] += 1
            return job.emit(_timeout_event())
        late = False

        def on_text(piece: str) -> bool:
            nonlocal late
            if piece:
                job.emit(Event("delta", text=piece))
            late = late or time.monotonic() > job.deadline
            return job.cancelled or late

        try:
            c = job.run(on_text)
        except BackendError as err:
            ev = Event("error", text=str(err).splitlines()[0], finish_reason="upstream")
        except SlmkitError as err:
            ev = Event("error", text=str(err).splitlines()[0], finish_reason="invalid")
        except Exception as err:
            if template_error(err):
                ev = Event("error", text="the chat template rejected these messages", finish_reason="invalid")
            else:
                log.exception("generation failed")
                self.stats["errors"] += 1
                ev = Event("error", text="internal error")
        else:
            if late:
                self.stats["requests_timed_out"] += 1
                ev = _timeout_event()
            elif job.cancelled:
                self.stats["requests_cancelled"] += 1
                ev = Event("done", finish_reason="cancelled")
            else:
                self.stats["requests_done"] += 1
                ev = Event("done", text=c.text, finish_reason=c.finish_reason, meta=c.meta, count=max(c.tokens, 0))
        job.emit(ev)


# --------------------------------------------------------------------------- idle connections


def _header_deadline_protocol():
    """uvicorn's h11 protocol with a deadline for each request's headers (see :func:`run`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        """Closes a connection whose next request's headers are not complete ``idle_timeout_s`` after it
        opened or after the previous response ended. The deadline is not moved by partial data: bytes
        trickled in one at a time do not keep a connection open (a slowloris client)."""

        _deadline: asyncio.TimerHandle | None = None

        def _watch(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._deadline is None:
                self._deadline = self.loop.call_later(self.config.slmkit_idle_timeout_s, self._expire)
            elif not waiting and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request within %s s", self.client, self.config.slmkit_idle_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def handle_events(self) -> None:
            super().handle_events()
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts the next cycle (client back to IDLE) unless pipelined data is waiting
            self._watch()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    return HeaderDeadlineH11


def uvicorn_config(app, host: str, port: int, cfg: ServerConfig, **kw):
    """The uvicorn ``Config`` both servers run under: the h11 protocol with the header deadline, and
    ``timeout_keep_alive`` = ``cfg.idle_timeout_s``."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=_header_deadline_protocol(),
                            timeout_keep_alive=cfg.idle_timeout_s, **kw)
    config.slmkit_idle_timeout_s = cfg.idle_timeout_s
    return config


def run(app, host: str, port: int, cfg: ServerConfig) -> None:
    """Serve ``app`` on host:port until interrupted (uvicorn, idle connections closed: :func:`uvicorn_config`)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, cfg)).run()

"""Fuzz and limits harness for slmkit's two servers (issue 17): ``slmkit serve`` and a collaboration mode.

Against real ``slmkit serve`` processes on tiny random models, on 127.0.0.1 only, bounded in
count and time:

1. **Fuzz**: ``--n`` schema-aware malformed requests per endpoint (``/v1/completions``,
   ``/v1/chat/completions``) on each server: a valid body with one to three fields given a
   wrong type, an out-of-range or non-finite value (``NaN``/``Infinity`` literals, ``1e400``,
   2**64 seeds, 5,000-digit integers), unpaired surrogates, deep nesting, or a raw body that
   is truncated, not UTF-8, not an object, empty or over the size limit. Passes when no
   response is a 5xx, every error (JSON or SSE event) has OpenAI's shape
   ``{"error": {"message", "type", "param", "code"}}``, every stream ends with ``[DONE]``,
   and ``/health`` answers throughout.
2. **Poison isolation**: ``--clients`` healthy greedy streaming clients (256 tokens each on
   ``serve``, 64 in the collaboration modes, which decode one request at a time) while a
   malformed request arrives every 100 ms, every other one a request issue 17 found breaking
   other requests (:data:`POISON`); every healthy stream's text must equal its solo baseline.
3. **Limits**: a ``--chunked-mb`` MB chunked body gets 413, with the server's resident memory
   growing by less than twice its ``--max-body-bytes``; after ``--disconnects`` random
   client disconnects (streaming and not) the active and queued counts are back to 0 within
   a second; ``--idle`` connections held open without a request leave the server's thread
   count where it was and ``/health`` answering.

Usage: PYTHONPATH=src python bench/fuzz_server.py [--n 10000] [--modes serve,speculative]
       [--clients 16] [--disconnects 100] [--idle 1000] [--chunked-mb 100] [--budget-s 1800]
       [--parts fuzz,poison,limits] [--json FILE]

The functions take a base URL, so ``tests/runtime/test_runtime_fuzz.py`` runs a small sample
of the same checks against in-process servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- malformed requests


class Raw:
    """A JSON fragment written verbatim (``NaN``, ``1e400``, a 5,000-digit integer, deep nesting)."""

    def __init__(self, text: str):
        self.text = text


def dumps(obj) -> bytes:
    """JSON with :class:`Raw` fragments spliced in (json.dumps cannot write them)."""
    raws: list[str] = []

    def mark(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: mark(v) for k, v in o.items()}
        if isinstance(o, list):
            return [mark(v) for v in o]
        return o

    text = json.dumps(mark(obj))
    for i, r in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), r)
    return text.encode("utf-8", "surrogatepass")


def _deep(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


NON_FINITE = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400")]
HUGE_INT = [Raw("9" * 5000), 2**64, 2**63, -(2**63) - 1, 10**30]
WRONG_TYPE = ["x", "", True, False, [], [1], {}, {"a": 1}, None]


def bad_values(field: str, chat: bool) -> list:
    """Schema-aware bad (and some valid edge) values for ``field``."""
    common = {
        "model": [5, [], ["tiny"], {}, "nope", "", True, "m" * 2000, "\ud800"],
        "max_tokens": [-1, 0, 1.5, "2", True, 2.0, 10**30, 2**31, 513, 100000, [], {}, *NON_FINITE, *HUGE_INT],
        "temperature": [-0.1, 2.5, "hot", True, [], 0.5, 1e-300, *NON_FINITE, *HUGE_INT],
        "top_p": [0, -1, 1.5, "x", False, 1e-9, 0.5, *NON_FINITE],
        "seed": [-1, 2**64, 2**64 - 1, 1.5, "1", True, 10**100, 0, *NON_FINITE, *HUGE_INT],
        "stop": [5, [1], ["a"] * 17, [None], "", [""], ["\ud800"], {"a": 1}, "e", ["e", " "], [[]], "x" * 5000],
        "stream": ["yes", 1, 0, [], {}, "true"],
        "stream_options": [[], "x", 1, {"include_usage": "yes"}, {"include_usage": 1}, {"include_usage": True},
                           {"include_usage": None}, {"other": 1}, _deep(40)],
        "n": [0, 2, "1", 1.5, -1, True, *NON_FINITE, *HUGE_INT],
        "kv_policy": [5, "nope", [], "", "streaming", "h2o", "int8", None, {"x": 1}],
        "kv_budget": [0, 1, -5, "10", True, 10**12, 2, *NON_FINITE, *HUGE_INT],
        "user": [5, [], {}, "\ud800"],
        "extra_field": [_deep(30), *WRONG_TYPE],
    }
    if chat:
        common.update({
            "messages": ["hi", [], [{}], [{"role": "user"}], [{"role": "user", "content": 5}],
                         [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                         [{"role": "user", "content": [{"type": "text", "text": "x"}]}], [1], [{"role": 5, "content": "x"}],
                         [{"role": "assistant", "content": "x"}], [{"role": "user", "content": "\ud800"}],
                         [{"role": "user", "content": None}], [{"role": "user", "content": "hi " * 3000}],
                         [{"role": "user", "content": _deep(200)}], [{"role": "tool", "content": "x"}],
                         [{"role": "system", "content": "x"}] * 50, None, {}],
            "max_completion_tokens": common["max_tokens"],
            "logprobs": ["yes", 3, True, [], *NON_FINITE],
            "top_logprobs": [-1, 21, "2", 2, 1.5, True, *NON_FINITE],
        })
    else:
        common.update({
            "prompt": [5, None, [], [[1, 2]], [1, 2, 3], [-1], [10**9], [True, False], ["a", "b"], {"x": 1}, "\ud800",
                       "x" * 5000, "", ["only"], [2**64], [1.5], _deep(100), "the cat " * 400],
            "logprobs": [-1, 21, "3", 2.5, True, False, [], 5, *NON_FINITE],
            "echo": ["yes", 1, True, [], None],
        })
    return common[field]


def base_body(chat: bool, model: str | None, stream: bool) -> dict:
    body = {"max_tokens": 2, "temperature": 0, "stream": stream}
    if model is not None:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "The cat"
    return body


def malformed(rng: random.Random, endpoint: str, model: str | None, limit: int) -> bytes:
    """One malformed request body for ``endpoint`` (``limit``: the server's body limit)."""
    chat = "chat" in endpoint
    body = base_body(chat, model, rng.random() < 0.3)
    r = rng.random()
    if r < 0.8:  # field-level: one to three fields get bad values
        fields = ["model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
                  "kv_policy", "kv_budget", "user", "extra_field", "logprobs"]
        fields += ["messages", "max_completion_tokens", "top_logprobs"] if chat else ["prompt", "echo"]
        for f in rng.sample(fields, rng.randint(1, 3)):
            body[f] = rng.choice(bad_values(f, chat))
        return dumps(body)
    good = dumps(body)
    kind = rng.randrange(9)
    if kind == 0:
        return good[: rng.randrange(len(good))]  # truncated
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # noise
    if kind == 2:
        return good.replace(b'"', b"\xff", 1)  # not UTF-8
    if kind == 3:
        return rng.choice([b"[]", b"null", b"1", b'"x"', b"true", b"[1,2]", b"{}"])
    if kind == 4:
        return b""
    if kind == 5:
        return b"[" * min(limit - 1, 200_000) if rng.random() < 0.5 else dumps({**body, "x": _deep(min(limit // 2 - 64, 5000))})
    if kind == 6:
        return dumps({**body, "pad": "p" * (limit + 1)})  # over the limit
    if kind == 7:
        return good.replace(b"{", b'{"max_tokens": NaN, ', 1)
    return good + b"garbage"


def _shape_problem(obj) -> str | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return "no error object"
    if set(err) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return "error message/type not strings"
    return None


def check(resp: httpx.Response, body_text: str) -> str | None:
    """What is wrong with one response (None: fine)."""
    if resp.status_code >= 500:
        return f"{resp.status_code}: {body_text[:200]}"
    ctype = resp.headers.get("content-type", "")
    if resp.status_code >= 400:
        try:
            obj = json.loads(body_text)
        except ValueError:
            return f"{resp.status_code} body not JSON: {body_text[:100]}"
        p = _shape_problem(obj)
        return None if p is None else f"{resp.status_code}: {p}"
    if "text/event-stream" in ctype:
        lines = [ln for ln in body_text.splitlines() if ln.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return "stream without [DONE]"
        for ln in lines[:-1]:
            obj = json.loads(ln[6:])
            if "error" in obj and _shape_problem(obj) is not None:
                return f"stream error event: {_shape_problem(obj)}"
        return None
    obj = json.loads(body_text)
    return None if isinstance(obj.get("choices"), list) else "200 without choices"


def fuzz(url: str, endpoint: str, n: int, seed: int = 0, model: str | None = None, limit: int = 65536,
         concurrency: int = 8, deadline: float = float("inf"), timeout: float = 120.0) -> dict:
    """``n`` malformed requests to ``url + endpoint``; statuses, problems, and /health checks."""
    statuses: Counter = Counter()
    problems: list[str] = []
    alive_fail = [0]
    lock = threading.Lock()
    rng = random.Random(seed)
    bodies = [malformed(rng, endpoint, model, limit) for _ in range(n)]
    sent = [0]

    def one(i: int, client: httpx.Client) -> None:
        if time.monotonic() > deadline:
            return
        body = bodies[i]
        try:
            with client.stream("POST", url + endpoint, content=body, headers={"content-type": "application/json"}) as r:
                text = b"".join(r.iter_bytes()).decode("utf-8", "replace")
            p = check(r, text)
            status = r.status_code
        except httpx.HTTPError as err:
            p, status = f"transport error {type(err).__name__}: {err}", "transport"
        with lock:
            sent[0] += 1
            statuses[str(status)] += 1
            if p is not None and len(problems) < 50:
                problems.append(f"{p} <- {body[:160]!r}")
            elif p is not None:
                problems.append("...")
        if i % 500 == 0:
            try:
                ok = httpx.get(url + "/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                with lock:
                    alive_fail[0] += 1

    t0 = time.perf_counter()
    local = threading.local()

    def task(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout)
        one(i, local.client)

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(task, range(n)))
    wall = time.perf_counter() - t0
    return {"endpoint": endpoint, "requests": sent[0], "wall_s": round(wall, 1), "per_s": round(sent[0] / max(wall, 1e-9), 1),
            "statuses": dict(sorted(statuses.items())), "5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "problems": len(problems), "first_problems": problems[:10], "health_failures": alive_fail[0]}


# --------------------------------------------------------------------------- poison isolation


def _stream_text(client: httpx.Client, url: str, body: dict) -> str:
    out = []
    with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return f"<HTTP {r.status_code}>"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return f"<error event {obj['error']['message']}>"
            if obj.get("choices"):
                out.append(obj["choices"][0]["text"])
    return "".join(out)


#: the requests issue 17 found breaking other clients' requests, sent between random malformed ones
POISON = [
    {"prompt": "x", "seed": 2**64, "max_tokens": 4, "temperature": 1},
    {"prompt": "x", "temperature": Raw("NaN"), "max_tokens": 4},
    {"prompt": "x", "temperature": 1e-300, "max_tokens": 4, "stream": True},
    {"prompt": "x", "max_tokens": Raw("Infinity")},
    {"prompt": "x", "model": ["tiny"]},
    {"prompt": "x", "stream": True, "stream_options": [1]},
    {"prompt": "x", "top_p": 1e-300, "temperature": 2, "max_tokens": 4},
    {"prompt": [0, 1, 2, 99999999]},
    {"prompt": "x", "kv_policy": "h2o", "kv_budget": 2, "max_tokens": 4},
]


def poison(url: str, model: str | None = None, clients: int = 16, tokens: int = 128, interval: float = 0.1, seed: int = 1) -> dict:
    """Healthy greedy streams while a malformed request arrives every ``interval`` s: each equals its solo baseline.

    Every other malformed request is one of :data:`POISON`, the rest random (:func:`malformed`).
    """
    prompts = [f"The {w} sees" for w in ("cat", "dog", "bird", "river", "house", "tree", "sun", "boat")]
    bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": tokens, "temperature": 0, **({"model": model} if model else {})}
              for i in range(clients)]
    with httpx.Client(timeout=300) as c:
        baseline = {b["prompt"]: _stream_text(c, url, b) for b in bodies}
    stop = threading.Event()
    rng = random.Random(seed)
    poisoned = Counter()
    lock = threading.Lock()

    def send(ep: str, body: bytes) -> None:
        try:
            with httpx.Client(timeout=120) as c:
                status = str(c.post(url + ep, content=body, headers={"content-type": "application/json"}).status_code)
        except httpx.HTTPError:
            status = "transport"
        with lock:
            poisoned[status] += 1

    def attacker(pool: ThreadPoolExecutor) -> None:  # one request every ``interval`` s, never waiting for answers
        i = 0
        while not stop.is_set():
            i += 1
            if i % 2:
                pool.submit(send, "/v1/completions", dumps(POISON[(i // 2) % len(POISON)]))
            else:
                ep = rng.choice(ENDPOINTS)
                pool.submit(send, ep, malformed(rng, ep, model, 65536))
            stop.wait(interval)

    with ThreadPoolExecutor(64) as pool:
        t = threading.Thread(target=attacker, args=(pool,), daemon=True)
        t.start()
        time.sleep(2 * interval)
        with ThreadPoolExecutor(clients) as ex:
            def run(b):
                with httpx.Client(timeout=300) as c:
                    return _stream_text(c, url, b)

            got = list(ex.map(run, bodies))
        stop.set()
        t.join(timeout=60)
    equal = sum(g == baseline[b["prompt"]] for g, b in zip(got, bodies))
    return {"clients": clients, "equal_to_baseline": equal, "malformed_sent": sum(poisoned.values()),
            "malformed_5xx": sum(v for k, v in poisoned.items() if k.startswith("5")),
            "malformed_statuses": dict(poisoned), "mismatches": [(b["prompt"], g[:80], baseline[b["prompt"]][:80])
                                                                  for g, b in zip(got, bodies) if g != baseline[b["prompt"]]][:3]}


# --------------------------------------------------------------------------- limits


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def chunked(url: str, total_bytes: int, piece: int = 1 << 16, pid: int | None = None, timeout: float = 120.0) -> dict:
    """POST a ``total_bytes`` chunked body (no Content-Length) over a raw socket; stop when the server answers.

    Returns the status, how much was sent before the answer, and (with ``pid``) the server's peak RSS growth.
    """
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=timeout)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" % u.hostname.encode())
    payload = b'{"prompt": "' + b"a" * (piece - 12)
    frame = b"%x\r\n%s\r\n" % (len(payload), payload)
    sent, reply, base, peak = 0, b"", rss_bytes(pid) if pid else 0, 0
    t0 = time.monotonic()
    s.setblocking(False)
    try:
        view = memoryview(frame)
        off = 0
        while sent < total_bytes and time.monotonic() - t0 < timeout:
            readable, writable, _ = select.select([s], [s], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    n = s.send(view[off:])
                except (BrokenPipeError, ConnectionResetError):
                    break
                off += n
                if off == len(frame):
                    off, sent = 0, sent + len(payload)
            if pid:
                peak = max(peak, rss_bytes(pid) - base)
        s.setblocking(True)
        s.settimeout(10)
        with contextlib.suppress(OSError):
            while not _complete(reply):
                got = s.recv(65536)
                if not got:
                    break
                reply += got
    finally:
        s.close()
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    body = reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""
    if pid:
        peak = max(peak, rss_bytes(pid) - base)
    return {"status": status, "sent_bytes": sent, "total_bytes": total_bytes, "rss_growth_bytes": peak if pid else None,
            "error_shape_ok": status is not None and _shape_problem(_json_or_none(body)) is None}


def _complete(reply: bytes) -> bool:
    """Whether ``reply`` holds a whole HTTP response with a Content-Length body."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return False


def _json_or_none(b: bytes):
    try:
        return json.loads(b)
    except ValueError:
        return None


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def idle(url: str, pid: int, n: int = 1000, hold_s: float = 3.0) -> dict:
    """``n`` connections that never send a request: the server's threads and memory before, while held, and
    whether it still answers; then how many of them it has closed by itself after ``hold_s`` seconds."""
    u = urlparse(url)
    before = {"threads": threads_of(pid), "rss_mb": round(rss_bytes(pid) / 2**20, 1)}
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((u.hostname, u.port), timeout=10))
        time.sleep(hold_s)
        held = {"threads": threads_of(pid), "rss_mb": round(rss_bytes(pid) / 2**20, 1)}
        t0 = time.monotonic()
        alive = httpx.get(url + "/health", timeout=30).status_code == 200
        health_s = round(time.monotonic() - t0, 3)
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
    finally:
        for s in socks:
            s.close()
    return {"connections": n, "before": before, "held": held, "health_ok": alive, "health_s": health_s,
            "closed_by_server_after_s": {hold_s: closed}}


def disconnects(url: str, n: int = 100, model: str | None = None, seed: int = 2, concurrency: int = 8) -> dict:
    """``n`` clients that leave at random moments (streaming or not); seconds until active and queued are 0."""
    rng = random.Random(seed)
    plans = [(rng.random() < 0.7, rng.randint(0, 3), rng.uniform(0.0, 0.3), rng.choice(ENDPOINTS)) for _ in range(n)]

    def leave(plan) -> None:
        streaming, lines, wait, ep = plan
        body = base_body("chat" in ep, model, streaming)
        body["max_tokens"] = 400
        try:
            with httpx.Client(timeout=httpx.Timeout(30, read=wait + 0.05 if not streaming else 30)) as c:
                with c.stream("POST", url + ep, json=body) as r:
                    if streaming:
                        for i, _ in enumerate(r.iter_lines()):
                            if i >= lines:
                                break
                    else:
                        r.read()
        except httpx.HTTPError:
            pass  # the client gave up: that is the point

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(leave, plans))
    t_last = time.monotonic()
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if h.get("active", 0) == 0 and h.get("queued", 0) == 0:
            return {"clients": n, "seconds_to_idle": round(time.monotonic() - t_last, 3), "health": h}
        if time.monotonic() - t_last > 30:
            return {"clients": n, "seconds_to_idle": None, "health": h}
        time.sleep(0.02)


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], timeout: float = 300.0):
    """``slmkit serve ARGS`` on 127.0.0.1 (a free port); yields (url, pid)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", *args, "--host", LOOPBACK, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://{LOOPBACK}:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def serve_app(app):
    """An ASGI app on a uvicorn server in this process (127.0.0.1, a free port); yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def tiny_models(root: Path) -> tuple[Path, Path]:
    """(large, small) tiny random llamas saved as model directories (init std 0.2: varied greedy text)."""
    from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    large = tiny_model(tiny_llama_config(tok, layers=2, initializer_range=0.2), seed=41)
    small = tiny_model(tiny_llama_config(tok, layers=1, initializer_range=0.2), seed=42)
    return save_tiny(large, tok, root / "large"), save_tiny(small, tok, root / "small")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="malformed requests per endpoint per server")
    ap.add_argument("--modes", default="serve,speculative", help="serve and/or collaboration modes (speculative, cascade)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--disconnects", type=int, default=100)
    ap.add_argument("--idle", type=int, default=1000, help="connections held open without a request")
    ap.add_argument("--chunked-mb", type=int, default=100)
    ap.add_argument("--max-body-bytes", type=int, default=1_000_000, help="the servers' limit (slmkit's default)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600, help="the servers' --timeout (a queued request's wait counts)")
    ap.add_argument("--budget-s", type=float, default=1800, help="stop fuzzing a server after this many seconds")
    ap.add_argument("--parts", default="fuzz,poison,limits", help="which checks to run")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "n": a.n,
               "max_body_bytes": a.max_body_bytes, "servers": {}}
    limits = ["--max-body-bytes", str(a.max_body_bytes), "--timeout", str(a.timeout), "--max-queue", "64"]
    with tempfile.TemporaryDirectory() as tmp:
        large, small = tiny_models(Path(tmp))
        for mode in a.modes.split(","):
            args = [str(large), "--name", "tiny", *limits] if mode == "serve" else \
                [str(small), "--large", str(large), "--mode", mode, "--name", "tiny", *limits]
            with serve_process(args) as (url, pid):
                r: dict = {"args": " ".join(args[1:])}
                deadline = time.monotonic() + a.budget_s
                parts = a.parts.split(",")
                if "fuzz" in parts:
                    r["fuzz"] = [fuzz(url, ep, a.n, seed=i, model="tiny", limit=a.max_body_bytes, concurrency=a.concurrency,
                                      deadline=deadline) for i, ep in enumerate(ENDPOINTS)]
                    print(json.dumps({mode: r["fuzz"]}, indent=1), flush=True)
                if "poison" in parts:  # the pairs decode one request at a time: shorter streams keep the run short
                    r["poison"] = poison(url, "tiny", a.clients, tokens=256 if mode == "serve" else 64)
                if "limits" in parts:
                    r["chunked"] = chunked(url, a.chunked_mb << 20, pid=pid)
                    r["disconnects"] = disconnects(url, a.disconnects, "tiny")
                    r["idle"] = idle(url, pid, a.idle)
                r["alive"] = httpx.get(url + "/health", timeout=10).status_code == 200
                r["rss_mb_end"] = round(rss_bytes(pid) / 2**20, 1)
                print(json.dumps({mode: {k: v for k, v in r.items() if k != "fuzz"}}, indent=1), flush=True)
            results["servers"][mode] = r
    ok = all(f["5xx"] == 0 and f["problems"] == 0 and f["health_failures"] == 0
             for r in results["servers"].values() for f in r.get("fuzz", []))
    for r in results["servers"].values():
        p, c, d, i = (r.get(k) for k in ("poison", "chunked", "disconnects", "idle"))
        ok = ok and r["alive"] and (p is None or (p["equal_to_baseline"] == p["clients"] and p["malformed_5xx"] == 0))
        ok = ok and (c is None or (c["status"] == 413 and (c["rss_growth_bytes"] or 0) < 2 * a.max_body_bytes))
        ok = ok and (d is None or (d["seconds_to_idle"] is not None and d["seconds_to_idle"] <= 1.0))
        ok = ok and (i is None or (i["health_ok"] and i["held"]["threads"] <= i["before"]["threads"] + 4))
    results["pass"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({"pass": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Idle connections (issue 17): both servers run uvicorn through servecore.run, which closes a connection
that sends no complete request within ``idle_timeout_s`` of opening or of its previous response."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from fastapi import FastAPI

from slmkit.runtime.servecore import ServerConfig, uvicorn_config

IDLE = 0.6


@pytest.fixture
def server():
    """A uvicorn server on 127.0.0.1 with the servers' config (idle timeout 0.6 s); yields its port."""
    import uvicorn

    app = FastAPI()

    @app.get("/fast")
    async def fast():
        return {"ok": True}

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(3 * IDLE)  # a response may take longer than the idle timeout
        return {"ok": True}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, ServerConfig(idle_timeout_s=IDLE)))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield port, srv
    srv.should_exit = True
    t.join(10)


def _closed_after(s: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``s`` (reads and discards whatever it sends), at most ``limit``."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return float("inf")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_a_connection_that_sends_nothing_is_closed(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        waited = _closed_after(s, 10)
    assert IDLE * 0.8 <= waited < IDLE + 2, waited


def test_headers_trickled_in_do_not_keep_a_connection_open(server):
    """A slowloris client: a byte every 0.1 s never completes the headers; closed at the deadline all the same."""
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        closed = False
        for b in b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200:
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > IDLE + 2:
                break
        waited = time.monotonic() - t0 if closed else (time.monotonic() - t0) + _closed_after(s, 5)
    assert waited < IDLE + 2.5, waited


def test_complete_requests_are_answered_and_the_kept_alive_connection_then_closes(server):
    port, srv = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        for path in ("/fast", "/slow"):  # /slow runs 3x the idle timeout: the deadline does not cut a request
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.settimeout(10)
            data = b""
            while not data.endswith(b'{"ok":true}'):
                chunk = s.recv(65536)
                assert chunk, f"closed before the response to {path}: {data!r}"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
        waited = _closed_after(s, 10)  # then idle again: closed after the timeout
    assert IDLE * 0.8 <= waited < IDLE + 2, waited


def test_many_idle_connections_are_all_closed(server):
    port, srv = server
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        time.sleep(0.2)
        assert len(srv.server_state.connections) == 200
        deadline = time.monotonic() + IDLE + 3
        while srv.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.server_state.connections) == 0
    finally:
        for s in socks:
            s.close()


def test_idle_timeout_must_be_positive():
    from slmkit.errors import ConfigError

    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="idle_timeout_s"):
            ServerConfig(idle_timeout_s=bad)


def test_serve_cli_passes_idle_timeout(monkeypatch, tiny_dir):
    """`slmkit serve --idle-timeout N` reaches the config both servers run under."""
    from slmkit.cli import main
    from slmkit.runtime import servecore

    seen = {}
    monkeypatch.setattr(servecore, "run", lambda app, host, port, cfg: seen.setdefault("cfg", cfg))
    assert main(["serve", str(tiny_dir), "--idle-timeout", "7.5", "--port", "1"]) == 0
    assert seen["cfg"].idle_timeout_s == 7.5

"""A tiny OpenAI-compatible HTTP server for tests (standard library only).

Replies are a pure function of (prompt, seed, temperature), so any client concurrency must
give the same texts. Each request sleeps ``delay`` seconds, and the server records how many
requests were in flight at once. Prompts containing ``FLAKY`` get a 503 on their first try;
prompts containing ``POISON`` always get a 400.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def reply_for(prompt: str, seed, temperature: float, n: int = 12) -> str:
    """The fake model: ``n`` words drawn from a hash of what decides a real model's sample."""
    key = prompt if not temperature else f"{prompt}|{seed}|{temperature}"
    h = hashlib.sha256(key.encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in h[:n])


class FakeOpenAI:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.attempts: dict[str, int] = {}  #: prompt text -> requests seen
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, path: str, body: dict) -> tuple[int, dict]:
        chat = path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        with self.lock:
            self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
            tries = self.attempts[prompt]
        if "POISON" in prompt:
            return 400, {"error": {"message": "poisoned prompt"}}
        if "FLAKY" in prompt and tries == 1:
            return 503, {"error": {"message": "overloaded, try again"}}
        if body.get("echo"):
            toks = prompt.split(" ")
            toks = [t if i == 0 else " " + t for i, t in enumerate(toks)]
            offs = [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
            lps = [None] + [-0.1 * len(t) for t in toks[1:]]
            return 200, {"choices": [{"text": prompt, "logprobs": {"tokens": toks, "token_logprobs": lps, "text_offset": offs}}]}
        text = reply_for(prompt, body.get("seed"), float(body.get("temperature") or 0))
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return 200, {"choices": [{**choice, "finish_reason": "stop"}]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay)
                    code, obj = fake._answer(self.path, body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                self._send(code, obj)

        return Handler

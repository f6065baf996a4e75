"""A small sample of bench/fuzz_server.py (issue 17) against both servers, in process on 127.0.0.1.

The full counts (10,000 malformed requests per endpoint, 16 clients, a 100 MB body, 100
disconnects) are a recorded run: see docs/reliability.md.
"""

from __future__ import annotations

import pytest

from slmkit.collab.serving import SpeculativeBackend
from slmkit.collab.serving import create_app as collab_app
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.runtime import generate as G
from slmkit.runtime.engine import Engine
from slmkit.runtime.server import create_app
from slmkit.runtime.servecore import ServerConfig

LIMIT = 65536


@pytest.fixture(scope="module", params=["serve", "speculative"])
def url(request, lively, tiny_tok, fz):
    model, tok = lively
    cfg = ServerConfig(max_body_bytes=LIMIT, request_timeout_s=60, max_queue=64)
    if request.param == "serve":
        app = create_app(Engine({"tiny": G.build(model)}, tok), cfg=cfg)
    else:
        small = tiny_model(tiny_llama_config(tiny_tok, layers=1, initializer_range=0.2), seed=42)
        app = collab_app(SpeculativeBackend(model, tok, small), name="tiny", cfg=cfg)
    with fz.serve_app(app) as u:
        yield u


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_sample_no_5xx_openai_errors(url, fz, endpoint):
    r = fz.fuzz(url, endpoint, 80, seed=len(endpoint), model="tiny", limit=LIMIT, concurrency=4)
    assert r["requests"] == 80 and r["5xx"] == 0 and r["health_failures"] == 0, r
    assert r["problems"] == 0, r["first_problems"]
    assert r["statuses"].get("400", 0) > 40  # most are refused, some happen to be valid


def test_poison_isolation_sample(url, fz):
    r = fz.poison(url, "tiny", clients=4, tokens=8, interval=0.05)
    assert r["equal_to_baseline"] == 4 and r["malformed_sent"] >= 1 and r["malformed_5xx"] == 0, r


def test_chunked_body_stops_at_the_limit(url, fz):
    r = fz.chunked(url, 64 << 20)
    assert r["status"] == 413 and r["error_shape_ok"]
    assert r["sent_bytes"] < 32 << 20  # answered long before the body ended: it was never read in full


def test_disconnects_return_to_idle_within_a_second(url, fz):
    r = fz.disconnects(url, 12, "tiny", concurrency=4)
    assert r["seconds_to_idle"] is not None and r["seconds_to_idle"] <= 1.0, r

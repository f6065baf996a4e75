"""The HTTP backend against a real uvicorn server (slmkit serve) on 127.0.0.1 serving a tiny model."""

import socket
import time

import pytest

from slmkit.backends import GenParams, HFBackend, OpenAIBackend
from slmkit.errors import BackendError, ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, start_server):
    url, stop = start_server(tiny_dir, "--name", "tiny")
    yield url
    stop()


def test_http_generate_matches_local(server, tiny_llama):
    model, tok = tiny_llama
    local = HFBackend(model, tok)
    remote = OpenAIBackend(server)
    assert remote.model == "tiny"
    p = GenParams(max_new_tokens=8)
    assert remote.generate(["The cat sees"], p)[0].text == local.generate(["The cat sees"], p)[0].text
    chat = [{"role": "user", "content": "Where is the river?"}]
    assert remote.generate([chat], p)[0].text == local.generate([chat], p)[0].text


def test_http_score_matches_local(server, tiny_llama):
    model, tok = tiny_llama
    local = HFBackend(model, tok).score([" the house."], ["The cat sees"])[0]
    remote = OpenAIBackend(server).score([" the house."], ["The cat sees"])[0]
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-4)


def test_openai_client_talks_to_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)


def test_http_bad_request_is_clear(server):
    with pytest.raises(BackendError, match="HTTP 400"):
        OpenAIBackend(server)._request("POST", "/completions", {"prompt": 5})


def test_unreachable_endpoint_retries_then_fails():
    port = _free_port()
    t0 = time.time()
    with pytest.raises(BackendError, match="after 3 tries"):
        OpenAIBackend(f"http://127.0.0.1:{port}", model="x", retries=2, backoff=0.05).generate(["hi"], GenParams(max_new_tokens=1))
    assert time.time() - t0 < 10


def test_genparams_validation():
    with pytest.raises(ConfigError, match="temperature"):
        GenParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        GenParams(top_p=0)


def test_hf_generate_stop_and_seed(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    greedy = be.generate(["The cat"], GenParams(max_new_tokens=12))[0]
    assert greedy.tokens == 12 and greedy.finish_reason == "length"
    if len(greedy.text.strip()) > 3:
        stop = greedy.text.strip()[2:4]
        cut = be.generate(["The cat"], GenParams(max_new_tokens=12, stop=(stop,)))[0]
        assert stop not in cut.text and greedy.text.startswith(cut.text)
    a = be.generate(["The cat"], GenParams(max_new_tokens=10, temperature=1.0, seed=3))[0].text
    b = be.generate(["The cat"], GenParams(max_new_tokens=10, temperature=1.0, seed=3))[0].text
    assert a == b
    lp = be.generate(["The cat"], GenParams(max_new_tokens=5, logprobs=True))[0].logprobs
    assert len(lp) == 5 and all(v <= 0 for v in lp)

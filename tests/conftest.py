"""Shared fixtures: tiny random models (built in process), the default model, the shared data."""

from __future__ import annotations

import os

import pytest
import torch

from slmkit.data.paths import data_dir
from slmkit.models.tiny import save_tiny, tiny_corpus, tiny_llama_config, tiny_model, tiny_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tok):
    """(model, tokenizer): 2 layers, hidden 64, GQA 4/2, tied embeddings."""
    return tiny_model(tiny_llama_config(tiny_tok)), tiny_tok


@pytest.fixture(scope="session")
def tiny_dir(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    return save_tiny(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tmp_path_factory):
    from slmkit.export.gguf import export_gguf

    model, tok = tiny_llama
    return export_gguf(model, tok, tmp_path_factory.mktemp("tinygguf") / "tiny.gguf", "F32")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """600 lines of the tiny corpus: calibration text for quantisers on the tiny models."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(tiny_corpus(600)))
    return p


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), fp32; for integration tests."""
    from slmkit.models import load

    return load("default")


@pytest.fixture(scope="session")
def shared_data():
    root = data_dir()
    if root is None or not root.is_dir():
        pytest.skip(f"shared data not found ({root or '../shared/data'}): set SLMKIT_DATA to the folder holding wikitext-2/, truthfulqa/, ...")
    return root


@pytest.fixture
def shared_file(shared_data):
    """``shared_file("wikitext-2/test.txt")`` -> Path, or skip naming the missing file."""

    def get(relative: str):
        path = shared_data / relative
        if not path.exists():
            pytest.skip(f"shared data file {path} not found (set SLMKIT_DATA)")
        return path

    return get


@pytest.fixture(scope="session")
def start_server():
    """``start_server(model_dir, *flags) -> (url, stop)``: a real ``slmkit serve`` process on 127.0.0.1."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    procs = []

    def start(model_dir, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "slmkit", "serve", str(model_dir), "--port", str(port), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode())
            time.sleep(0.2)

        def stop():
            proc.terminate()
            proc.wait(timeout=20)

        return url, stop

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-op tests (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""`generate --fast`, the FastBackend and LoRA adapters served by name."""

import json

import pytest
import torch

from slmkit.backends import GenParams, HFBackend
from slmkit.runtime.backend import FastBackend


@pytest.fixture(scope="module")
def lively_dir(lively, tmp_path_factory):
    from slmkit.models.tiny import save_tiny

    model, tok = lively
    return save_tiny(model, tok, tmp_path_factory.mktemp("lively_cli") / "model")


def test_fast_backend_matches_hf_backend(lively):
    model, tok = lively
    hf, fast = HFBackend(model, tok), FastBackend(model, tok)
    for prompt in ["The cat sees", [{"role": "user", "content": "Where is the river?"}]]:
        p = GenParams(max_new_tokens=20, logprobs=True)
        a, b = hf.generate([prompt], p)[0], fast.generate([prompt], p)[0]
        assert (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    full = fast.generate(["The cat sees"], GenParams(max_new_tokens=20))[0].text
    stop = full.strip()[2:4]
    cut = fast.generate(["The cat sees"], GenParams(max_new_tokens=20, stop=(stop,)))[0]
    assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"
    s1 = fast.generate(["The cat"], GenParams(max_new_tokens=8, temperature=1.0, seed=4))[0].text
    assert s1 == fast.generate(["The cat"], GenParams(max_new_tokens=8, temperature=1.0, seed=4))[0].text


def test_generate_fast_flag_equals_default_path(lively_dir, capsys):
    from slmkit.cli import main

    outs = []
    for extra in ([], ["--fast"], ["--fast", "--kv", "int8"]):
        assert main(["generate", str(lively_dir), "The small bird", "--raw", "--max-new-tokens", "12", "--json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["text"] == outs[1]["text"] and outs[1]["fast"] is True
    assert outs[2]["tokens"] >= 1
    assert main(["generate", str(lively_dir), "x", "--fast", "--kv", "bogus"]) == 2


def test_lora_adapter_served_by_name_equals_peft(lively, tmp_path):
    """An adapter merged into a copy of the base (what serve --adapter serves on the fast path) gives the logits of
    the PEFT model with that adapter active."""
    import copy

    from peft import LoraConfig, get_peft_model

    from slmkit.runtime import generate as G
    from slmkit.train.adapters import merged_models

    model, tok = lively
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)  # a non-trivial adapter (B starts at zero)
    peft_model.save_pretrained(tmp_path / "ad")
    ids = tok("The cat sees the", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits[0, -1]
    fms = {k: G.build(m) for k, m in merged_models(model, tok, {"alice": str(tmp_path / "ad")}).items()}
    got = G.prefill(fms["alice"], ids[0], fms["alice"].new_cache(context=32))
    assert torch.allclose(got, ref, atol=1e-4)
    base = G.prefill(G.build(model), ids[0], G.build(model).new_cache(context=32))
    assert not torch.allclose(base, ref, atol=1e-2)  # the adapter changed something; the base stays untouched
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[0, -1], base, atol=1e-4)
    from slmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="not valid"):
        merged_models(model, tok, {"bad name!": str(tmp_path / "ad")})


def test_serve_cli_serves_each_adapter_by_name(lively, lively_dir, tmp_path, monkeypatch):
    """`slmkit serve MODEL --adapter alice=DIR`: the base and the merged adapter, each picked by the request's model;
    alice answers as the PEFT model with her adapter active."""
    import copy

    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model

    from slmkit.cli import main
    from slmkit.runtime import servecore

    model, tok = lively
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "ad")
    seen = {}
    monkeypatch.setattr(servecore, "run", lambda app, host, port, cfg: seen.setdefault("app", app))
    assert main(["serve", str(lively_dir), "--adapter", f"alice={tmp_path / 'ad'}", "--port", "1"]) == 0
    body = {"prompt": "The cat sees", "max_tokens": 8, "temperature": 0}
    with TestClient(seen["app"]) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [str(lively_dir), "alice"]
        base = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        alice = client.post("/v1/completions", json={**body, "model": "alice"}).json()["choices"][0]["text"]
    params = GenParams(max_new_tokens=8)
    assert base == HFBackend(model, tok).generate(["The cat sees"], params)[0].text
    assert alice == HFBackend(peft_model, tok).generate(["The cat sees"], params)[0].text != base

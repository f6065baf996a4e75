"""Multi-adapter hook: one base, several LoRA adapters chosen per request; wrong-base adapters are refused."""

from __future__ import annotations

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.backends import GenParams
from slmkit.errors import ConfigError, SlmkitError
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.train.adapters import AdapterMismatchError, AdapterSet
from slmkit.train.sft import save_trained


def _random_adapter(base, tok, dest, seed):
    """A LoRA adapter with random (non-zero) A and B, written like `slmkit sft --lora` does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor([[1, 5, 9, 20]])).logits
    save_trained(peft_model, tok, dest, Manifest(source="tiny"))
    peft_model.unload()
    return want


@pytest.fixture(scope="module")
def two_adapters(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    want = {}
    for i, name in enumerate(["alice", "bob"]):
        base = tiny_model(tiny_llama_config(tiny_tok), seed=0)
        want[name] = _random_adapter(base, tiny_tok, d / name, seed=10 + i)
    return d, want


def test_each_request_gets_its_own_adapter(tiny_tok, two_adapters):
    d, want = two_adapters
    base = tiny_model(tiny_llama_config(tiny_tok), seed=0)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    aset = AdapterSet(base, tiny_tok, name="tiny")
    aset.add("alice", d / "alice")
    aset.add("bob", d / "bob")
    assert aset.names() == ["alice", "bob"]
    for name in ["bob", "alice", None, "bob"]:  # switch back and forth
        with aset.use(name) as backend, torch.no_grad():
            got = backend.model(input_ids=ids).logits
        assert torch.allclose(got, plain if name is None else want[name], atol=1e-5), name
    assert not torch.allclose(want["alice"], want["bob"], atol=1e-3)
    chat = [[{"role": "user", "content": "Where is the cat?"}]]
    p = GenParams(max_new_tokens=8)
    outs = {n: aset.generate(n, chat, p)[0].text for n in ["alice", "bob", None]}
    with aset.use("alice") as backend:
        assert backend.generate(chat, p)[0].text == outs["alice"]
    with pytest.raises(ConfigError, match="unknown adapter 'alic'"):
        aset.generate("alic", chat, p)
    aset.remove("bob")
    assert aset.names() == ["alice"]


def test_adapter_for_another_base_is_refused(tiny_tok, two_adapters):
    d, _ = two_adapters
    other = tiny_model(tiny_llama_config(tiny_tok), seed=99)  # same shapes, different weights
    aset = AdapterSet(other, tiny_tok, name="other")
    with pytest.raises(AdapterMismatchError, match="trained on base model"):
        aset.add("alice", d / "alice")
    wider = tiny_model(tiny_llama_config(tiny_tok, hidden=32, heads=2, kv_heads=1), seed=0)
    with pytest.raises(AdapterMismatchError):
        AdapterSet(wider, tiny_tok).add("alice", d / "alice")
    with pytest.raises(SlmkitError, match="not an adapter directory"):
        AdapterSet(other, tiny_tok).add("x", d)

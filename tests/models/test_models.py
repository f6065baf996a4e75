import json
import shutil

import pytest
import torch

from slmkit.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from slmkit.models import describe, describe_model, load, load_config
from slmkit.models.tiny import tiny_model


def test_load_directory_matches_in_memory(tiny_llama, tiny_dir):
    model, tok = tiny_llama
    m2, t2 = load(str(tiny_dir))
    ids = tok("The cat sees the house.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    assert t2("The cat sees the house.").input_ids == ids[0].tolist()


def test_load_gguf_matches_in_memory(tiny_llama, tiny_gguf):
    model, tok = tiny_llama
    m2, t2 = load(str(tiny_gguf))
    ids = tok("A dog likes green apples.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, m2(ids).logits)
    assert t2("A dog likes green apples.").input_ids == ids[0].tolist()
    assert t2.chat_template and t2.eos_token == tok.eos_token
    assert getattr(m2.config, "quantization_config", None) is None  # saves as a plain model


def test_load_bf16(tiny_dir):
    m, _ = load(str(tiny_dir), dtype="bf16")
    assert next(m.parameters()).dtype == torch.bfloat16


def test_unknown_dtype(tiny_dir):
    with pytest.raises(UnsupportedModelError, match="dtype"):
        load(str(tiny_dir), dtype="int7")


def test_nonexistent_path():
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load("./does/not/exist")


def test_text_file_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(UnsupportedModelError, match="not a model"):
        load(str(f))


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="truncated|corrupt"):
        load(str(bad))


def test_text_named_gguf(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_text("not really")
    with pytest.raises(CorruptModelError, match="not a GGUF"):
        load(str(bad))


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CorruptModelError, match="safetensors"):
        load(str(d))


def test_unknown_architecture(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "flurble"
    cfg["architectures"] = ["FlurbleForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="architecture"):
        load(str(d))


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_config("nobody/no-such-model-xyz")


def test_describe_counts_match_parameters(tiny_llama):
    model, _ = tiny_llama
    facts = describe_model(model)
    assert facts.parameters == sum(p.numel() for p in model.parameters())  # tied weights once
    assert facts.tied_embeddings
    assert facts.embedding_parameters == model.get_input_embeddings().weight.numel()
    assert facts.kv_heads == 2 and facts.attention == "GQA"
    # KV cache: 2 (K and V) x layers x kv_heads x head_dim x 1024 tokens x 2 bytes
    assert facts.kv_cache_bytes_per_1k_tokens["bf16"] == 2 * 2 * 2 * 16 * 1024 * 2
    assert describe(model.config).parameters == facts.parameters


def test_moe_model_info_and_generate(tiny_tok, tmp_path):
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=len(tiny_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=tiny_tok.pad_token_id, eos_token_id=tiny_tok.eos_token_id,
    )
    m = tiny_model(cfg)
    m.save_pretrained(tmp_path)
    tiny_tok.save_pretrained(tmp_path)
    loaded, tok = load(str(tmp_path))
    facts = describe_model(loaded)
    expert = sum(p.numel() for n, p in loaded.named_parameters() if ".experts." in n)
    assert expert > 0
    assert facts.parameters == sum(p.numel() for p in loaded.parameters())
    assert facts.active_parameters == facts.parameters - expert + expert * 2 // 4
    assert facts.experts == 4 and facts.experts_per_token == 2
    from slmkit.backends import GenParams, HFBackend

    out = HFBackend(loaded, tok).generate(["The cat"], GenParams(max_new_tokens=5))[0]
    assert out.tokens == 5 or out.finish_reason == "stop"


def test_model_readers_are_found_by_name(tiny_dir, tmp_path):
    """models.load reads compressed formats through the readers slmkit.plugins names, none for a plain directory."""
    from slmkit.models.readers import Reader, find_reader, readers
    from slmkit.plugins import MODEL_READERS

    found = readers()
    assert set(found) == set(MODEL_READERS) and all(isinstance(r, Reader) for r in found.values())
    assert find_reader(tiny_dir) is None
    (tmp_path / "config.json").write_text('{"slmkit_lowrank": {}}')
    assert find_reader(tmp_path) is found["lowrank"]
    (tmp_path / "quantized.safetensors").write_bytes(b"")
    assert find_reader(tmp_path) is found["packed-quantized"]  # tried first

"""Student architectures: MobileLLM-style llama configs, block-wise sharing stored once and reloaded tied."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from slmkit.errors import ConfigError
from slmkit.models.student import (
    PRESETS,
    StudentConfig,
    describe_sharing,
    load_student,
    make_student,
    save_student,
    unique_parameters,
)


def _tiny(share=2, layers=4):
    return StudentConfig(layers=layers, hidden=32, heads=4, kv_heads=2, intermediate=64, share=share, max_positions=64)


def test_train_student_config_is_llama_deep_thin(tiny_tok):
    m = make_student(_tiny(share=1), tiny_tok, seed=0)
    c = m.config
    assert c.model_type == "llama" and c.hidden_act == "silu" and c.tie_word_embeddings
    assert c.num_key_value_heads == 2 and c.num_attention_heads == 4 and c.vocab_size == len(tiny_tok)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert type(m.model.norm).__name__ == "LlamaRMSNorm"
    assert PRESETS["mobilellm-125m"].layers == 30 and PRESETS["mobilellm-125m"].hidden == 576
    assert StudentConfig(hidden=576).ffn == 1536  # 8/3 * 576 rounded up to a multiple of 64
    with pytest.raises(ConfigError, match="not divisible by kv_heads"):
        StudentConfig(heads=9, kv_heads=4)
    with pytest.raises(ConfigError, match="multiple of share"):
        StudentConfig(layers=5, share=2)


def test_train_student_shared_blocks_saved_once_and_reloaded_tied(tiny_tok, tmp_path):
    shared = make_student(_tiny(share=2, layers=4), tiny_tok, seed=1)
    plain = make_student(_tiny(share=1, layers=4), tiny_tok, seed=1)
    L = shared.model.layers
    assert L[1].self_attn.q_proj.weight is L[0].self_attn.q_proj.weight
    assert L[2].mlp.up_proj.weight is not L[1].mlp.up_proj.weight
    assert L[1].self_attn.layer_idx == 1  # own cache slot
    per_block = sum(p.numel() for p in L[0].parameters())
    assert unique_parameters(plain) - unique_parameters(shared) == 2 * per_block
    info = describe_sharing(shared)
    assert info == {"blocks": 4, "stored_blocks": 2, "share": 2, "unique_parameters": unique_parameters(shared)}

    # a training step keeps the tie (one Parameter, one gradient)
    opt = torch.optim.SGD(shared.parameters(), lr=0.1)
    ids = torch.tensor([tiny_tok("the cat sees a dog").input_ids])
    shared.train()
    shared(ids, labels=ids).loss.backward()
    opt.step()
    shared.eval()
    assert torch.equal(L[0].mlp.down_proj.weight, L[1].mlp.down_proj.weight)

    out = save_student(shared, tiny_tok, tmp_path / "s")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    layer_ids = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    assert layer_ids == {0, 2}  # followers are not stored
    assert "lm_head.weight" not in keys
    assert stored == unique_parameters(shared)  # every shared tensor exactly once

    with torch.no_grad():
        want = shared(ids).logits
    for reloaded in (load_student(out), _via_slmkit_load(out)):
        R = reloaded.model.layers
        assert R[1].self_attn.o_proj.weight is R[0].self_attn.o_proj.weight
        assert R[3].mlp.gate_proj.weight is R[2].mlp.gate_proj.weight
        with torch.no_grad():
            assert torch.allclose(reloaded(ids).logits, want, atol=1e-5)
        # cached generation equals uncached (per-block cache slots survive sharing)
        g1 = reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        g2 = reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(g1, g2)


def _via_slmkit_load(path):
    from slmkit.models import load

    return load(str(path))[0]

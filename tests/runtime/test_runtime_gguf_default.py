"""The fast path on the default model's own GGUF file (Q4_1 blocks, Q8_0-free): greedy output against
transformers' greedy output on the same file, dequantised.

The fast path rounds activations to int8 per 32 inputs for its quantised dot products, so its logits
differ from the dequantised fp32 forward in the third significant digit and a near-tie can flip a
token, after which two greedy continuations part. The documented tolerance: teacher-forced on
transformers' greedy continuation through the same decode steps, the fast path picks the same next
token at >= 85% of the 32 steps of each prompt and >= 90% over all, and at least one prompt agrees
exactly for all 32 tokens. Measured here (2026-12-04): agreement 0.91 / 0.94 / 1.00, free-running
greedy output identical for 5 / 8 / 32 tokens.
"""

from __future__ import annotations

import pytest
import torch

from slmkit.runtime import q4kernel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(q4kernel.load() is None, reason=f"slmkit's kernels unavailable: {q4kernel.why_unavailable()}"),
]

PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "def fibonacci(n):\n"]


def test_fast_gguf_greedy_matches_transformers(default_model):
    from slmkit.models.zoo import locate
    from slmkit.runtime.decoding import stream
    from slmkit.runtime.generate import decode_one_token, prefill
    from slmkit.runtime.gguffast import build_gguf

    model, tok = default_model
    fm = build_gguf(locate("default"), model=model)
    kls, agreements = [], []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref_ids = model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32)
            ref_logits = model(ref_ids).logits[0, ids.shape[1] - 1 : -1].float()
        ref = ref_ids[0, ids.shape[1]:].tolist()
        ours = [s.token for s in stream(fm, ids[0], 32)]
        first = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        # teacher-forced through the same decode steps: the prompt, then transformers' tokens one by one
        cache = fm.new_cache(context=ids.shape[1] + 33)
        logits = torch.stack([prefill(fm, ids[0], cache)] + [decode_one_token(fm, t, cache) for t in ref[:-1]]).float()
        agree = sum(int(x.argmax()) == b for x, b in zip(logits, ref)) / len(ref)
        lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
        kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
        print(f"{prompt!r}: identical for {first} of 32 tokens, teacher-forced agreement {agree:.2f}, KL {kl:.4f}")
        assert agree >= 0.85, (prompt, agree)
        agreements.append(agree)
        kls.append(kl)
    assert sum(agreements) / len(agreements) >= 0.9
    # the distributions, not only the argmax: int8 activations keep the mean KL to transformers' fp32 logits near
    # 0.004 (measured with the chunked and the superblock kernels alike); where free-running greedy text first
    # differs is a near-tie lottery that depends on the CPU's fp32 kernels, so it is printed, not asserted
    assert sum(kls) / len(kls) <= 0.01, kls

"""The fast path on the default model's own GGUF file (Q4_1 blocks, Q8_0-free): greedy output against
transformers' greedy output on the same file, dequantised.

The fast path rounds activations to int8 per 32 inputs for its quantised dot products, so its logits
differ from the dequantised fp32 forward in the third significant digit and a near-tie can flip a
token, after which two greedy continuations part. The documented tolerance: teacher-forced on
transformers' greedy continuation, the fast path picks the same next token at >= 90% of the 32 steps
of each prompt, and at least two of the three prompts agree exactly for all 32 tokens.
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
    from slmkit.runtime.generate import Segment, forward, stream
    from slmkit.runtime.gguffast import build_gguf

    model, tok = default_model
    fm = build_gguf(locate("default"), model=model)
    exact = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, ids.shape[1]:].tolist()
        ours = [s.token for s in stream(fm, ids[0], 32)]
        exact += ours == ref
        full = torch.tensor(ids[0].tolist() + ref)
        logits = forward(fm, [Segment(full, fm.new_cache(context=full.numel()), all_logits=True)])[0]
        picks = logits[ids.shape[1] - 1 : -1].argmax(-1).tolist()
        agree = sum(a == b for a, b in zip(picks, ref)) / len(ref)
        assert agree >= 0.9, (prompt, agree)
    assert exact >= 2

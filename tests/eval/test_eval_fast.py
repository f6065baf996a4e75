"""`slmkit eval --fast`: efficiency and perplexity of the path a user deploys, on a GGUF file's own codes."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import main
from slmkit.models.tiny import tiny_corpus
from slmkit.runtime import q4kernel

needs_kernel = pytest.mark.skipif(q4kernel.load() is None, reason=f"slmkit's kernels unavailable: {q4kernel.why_unavailable()}")


@pytest.fixture(scope="module")
def q8_gguf(tiny_llama, tmp_path_factory):
    from slmkit.export.gguf import export_gguf

    model, tok = tiny_llama
    return export_gguf(model, tok, tmp_path_factory.mktemp("evalfast") / "tiny-q8.gguf", "Q8_0")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("evaltext") / "t.txt"
    p.write_text("\n".join(tiny_corpus(80, seed=3)))
    return p


def _run(capsys, *args):
    rc = main(["eval", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@needs_kernel
def test_eval_fast_on_gguf_runs_the_file_codes(q8_gguf, text_file, capsys):
    fast = _run(capsys, q8_gguf, "--perplexity", text_file, "--context", "64", "--efficiency", "--fast")
    assert fast["path"] == "fast (file codes)"
    assert fast["decode_tokens_per_s"] > 0 and fast["prefill_tokens_per_s"] > 0
    ref = _run(capsys, q8_gguf, "--perplexity", text_file, "--context", "64")
    assert ref["path"] == "transformers"
    # the fast path rounds activations to int8 for its dot products: perplexity within 2%
    assert fast["perplexity_tokens"] == ref["perplexity_tokens"]
    assert abs(fast["perplexity"] / ref["perplexity"] - 1) < 0.02


def test_eval_fast_dense_and_flags(tiny_dir, text_file, capsys):
    res = _run(capsys, tiny_dir, "--efficiency", "--fast")
    assert res["path"] == "fast (fp32)" and res["decode_tokens_per_s"] > 0
    assert main(["eval", str(tiny_dir), "--efficiency", "--int4"]) == 2
    assert "add --fast" in capsys.readouterr().err

"""A packed quantised directory's own codes on the fast path (runtime/packedfast.py), and bad GGUF input to --fast.

Directories are written as ``slmkit quantize`` writes them (:func:`~slmkit.compress.qstore.save_quantized`,
the GGUF beside the packed codes by :func:`~slmkit.export.gguf.export_gguf_validated`) from tiny random
models. Tolerance where weights without a kernel run dequantised beside kernel weights: as in
test_runtime_gguf_fast.py (teacher-forced KL against transformers' fp32 forward on the same codes,
max 0.05 and mean 0.01 nats; the kernels round activations to int8 per 32, bf16 elsewhere).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from slmkit.runtime import decoding as D
from slmkit.runtime import generate as G
from slmkit.runtime import weights as W
from slmkit.runtime import q4kernel

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(q4kernel.load() is None, reason=f"slmkit's kernels unavailable: {q4kernel.why_unavailable()}")

SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
PROMPTS = ("The cat sees the", "A dog likes green apples. It is", "Hi")


def _tiny(tiny_tok, hidden: int = 256, seed: int = 7):
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    std = 0.2 * (128 / hidden) ** 0.5  # varied greedy text at every width (as test_runtime_gguf_fast.py)
    return tiny_model(tiny_llama_config(tiny_tok, hidden=hidden, heads=4, kv_heads=2, initializer_range=std), seed=seed)


def _write(model, tok, dest: Path, method: str, grid, ftype: str | None = None) -> Path:
    """What ``slmkit quantize MODEL --method M [--gguf FTYPE] --output DEST`` writes (small calibration)."""
    from slmkit.artefact import Manifest
    from slmkit.compress.qstore import save_quantized
    from slmkit.compress.quantize import QUANTIZERS, gguf_grids, quantize
    from slmkit.export.gguf import export_gguf_validated

    q = QUANTIZERS.get(method)
    cfg = q.config(grid=grid)
    ids = torch.randint(3, len(tok), (8, 64), generator=torch.Generator().manual_seed(4)) if q.needs_calibration else None
    grids = gguf_grids(model, ftype, imatrix=q.needs_calibration) if ftype else None
    res = quantize(model, method, cfg, ids, embeddings=ftype is not None, grids=grids, gguf=ftype)

    def beside(tmp: Path) -> None:
        export_gguf_validated(model, tok, tmp / f"model-{ftype}.gguf", ftype, res, check_loader=False,
                              imatrix=q.needs_calibration)

    return save_quantized(model, tok, res, dest, Manifest(source="tiny"), extra=beside if ftype else None)


@pytest.fixture(scope="module")
def gptq_kquant(tiny_tok, tmp_path_factory):
    """A GPTQ directory on llama.cpp's Q4_K_M grids with its GGUF beside it."""
    from slmkit.compress.qgrid import Grid

    return _write(_tiny(tiny_tok), tiny_tok, tmp_path_factory.mktemp("packed") / "gptq-q4km", "gptq",
                  Grid.for_gguf("Q4_K"), "Q4_K_M")


@pytest.fixture(scope="module")
def gptq_plain(tiny_tok, tmp_path_factory):
    """A GPTQ directory as `slmkit quantize --method gptq --bits 4` writes it (symmetric, groups of 128)."""
    from slmkit.compress.qgrid import Grid

    return _write(_tiny(tiny_tok), tiny_tok, tmp_path_factory.mktemp("packed") / "gptq-4bit", "gptq", Grid(4, 128, True))


def _fast(path: Path):
    from slmkit.models import load
    from slmkit.runtime.gguffast import build_gguf

    model, tok = load(str(path))
    return build_gguf(path, model=model), model, tok


def _held(fm) -> dict[str, W.Dense]:
    out = {}
    for i, ly in enumerate(fm.layers):
        for name, m in zip(SHORT, [*ly.qkv.parts, ly.o, *ly.gate_up.parts, ly.down]):
            out[f"model.layers.{i}.{name}.weight"] = m
    return out


def _greedy(fm, ids: torch.Tensor, n: int) -> list[int]:
    return [s.token for s in D.stream(fm, ids, n, temperature=0.0)]


# ---------------------------------------------------------------------------- codes reach the kernel


def test_gptq_codes_of_a_packed_dir_are_the_bytes_the_kernel_reads(gptq_kquant):
    """Every matrix holds the blocks of the GGUF written from the same directory (q/k rows in transformers'
    order: the file's rows un-permuted), which are qstore's codes encoded unchanged."""
    from slmkit.compress.qgrid import encode_gguf_blocks
    from slmkit.compress.qstore import PACKED, read_packed
    from slmkit.export.gguf import unpermute_qk, gguf_name

    fm, model, _ = _fast(gptq_kquant)
    _, codes, _, method = read_packed(gptq_kquant / PACKED)
    assert method == "gptq"
    file = {t.name: t for t in gguf.GGUFReader(str(gptq_kquant / "model-Q4_K_M.gguf")).tensors}
    c = model.config
    kinds = set()
    for name, m in _held(fm).items():
        t = file[gguf_name(name)]
        assert isinstance(m, W.GGUFQ) and m.qtype == int(t.tensor_type), name
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        if name.endswith("q_proj.weight"):
            raw = unpermute_qk(raw, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            raw = unpermute_qk(raw, c.num_key_value_heads)
        assert np.array_equal(m.q.numpy(), raw.numpy()), name
        assert np.array_equal(m.q.numpy(), encode_gguf_blocks(codes[name])), name
        kinds.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K"} <= kinds
    assert np.array_equal(fm.head.q.numpy(), np.asarray(file["token_embd.weight"].data))
    assert fm.embed is fm.head  # tied: the lookup reads the head's blocks
    assert fm.fused is not None and fm.fused_head is not None  # the one-call decode step and its head


def test_fast_greedy_on_a_packed_dir_equals_the_gguf_exported_from_it(gptq_kquant):
    from slmkit.runtime.gguffast import build_gguf

    fm, _, tok = _fast(gptq_kquant)
    from slmkit.models import load

    path = gptq_kquant / "model-Q4_K_M.gguf"
    ref = build_gguf(path, model=load(str(path))[0])
    varied = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids[0]
        got = _greedy(fm, ids, 24)
        assert got == _greedy(ref, ids, 24), prompt
        varied += len(set(got)) > 3
    assert varied >= 2  # the text is not one repeated token


def test_generate_fast_on_a_packed_dir_runs_its_codes(gptq_kquant, capsys):
    """Through the CLI: the directory's text equals its GGUF file's; --int4 alone would re-round the codes (exit 2)."""
    from slmkit.cli import main

    def text(spec) -> str:
        assert main(["generate", str(spec), PROMPTS[1], "--fast", "--raw", "--max-new-tokens", "16", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["text"]

    assert text(gptq_kquant) == text(gptq_kquant / "model-Q4_K_M.gguf")
    assert main(["generate", str(gptq_kquant), "x", "--fast", "--int4"]) == 2
    err = capsys.readouterr().err
    assert "second time" in err and gptq_kquant.name in err and "--dtype fp32" in err


def test_qat_codes_saved_beside_the_weights_run_as_they_are(tiny_tok, tmp_path, capsys):
    """``slmkit distill --qat Q4_0``'s output (weights + the packed codes training ended on) runs those codes."""
    from slmkit.cli import main
    from slmkit.compress.qgrid import encode_gguf_blocks
    from slmkit.compress.qstore import PACKED, read_packed
    from slmkit.models.tiny import tiny_corpus
    from slmkit.train.data import DataConfig
    from slmkit.train.distill import DistillConfig, distill
    from slmkit.train.losses import LossConfig

    data = tmp_path / "t.txt"
    data.write_text("\n".join(tiny_corpus(40, seed=4)))
    cfg = DistillConfig(loss=LossConfig("fkl"), data=DataConfig(block_size=24), max_steps=2, batch_size=2,
                        learning_rate=1e-3, save_steps=2, qat="Q4_0")
    distill(_tiny(tiny_tok, hidden=128), tiny_tok, data, tmp_path / "qat", cfg, teacher=_tiny(tiny_tok, hidden=128))
    fm, _, _ = _fast(tmp_path / "qat")
    _, codes, _, _ = read_packed(tmp_path / "qat" / PACKED)
    for name, m in _held(fm).items():
        assert isinstance(m, W.GGUFQ) and np.array_equal(m.q.numpy(), encode_gguf_blocks(codes[name])), name
    assert main(["generate", str(tmp_path / "qat"), "The cat", "--fast", "--raw", "--max-new-tokens", "4", "--json"]) == 0
    assert 1 <= json.loads(capsys.readouterr().out)["tokens"] <= 4


def test_the_cli_rule_for_packed_dirs(gptq_kquant):
    from slmkit.errors import ConfigError
    from slmkit.runtime.gguffast import file_codes

    assert file_codes(str(gptq_kquant), None) == gptq_kquant
    assert file_codes(str(gptq_kquant), "fp32") is None  # an explicit --dtype: the dequantised codes, as before
    assert file_codes(str(gptq_kquant), "fp32", "int4") is None  # ... which --int4 then re-rounds on purpose
    with pytest.raises(ConfigError, match="second time"):
        file_codes(str(gptq_kquant), None, "int4")


def test_a_plain_gptq_grid_runs_as_32_blocks_holding_the_same_values(gptq_plain):
    """--bits 4 (groups of 128): Q4_0 blocks with each group's fp16 scale in its four blocks; dequantised by the
    gguf package they are qstore's dequantised codes bit for bit. The unquantised embedding/head stay dense."""
    from slmkit.compress.qstore import PACKED, read_packed

    fm, _, _ = _fast(gptq_plain)
    _, codes, _, _ = read_packed(gptq_plain / PACKED)
    for name, m in _held(fm).items():
        assert isinstance(m, W.GGUFQ) and m.qtype == int(gguf.GGMLQuantizationType.Q4_0), name
        back = gguf.quants.dequantize(m.q.numpy(), gguf.GGMLQuantizationType.Q4_0)
        assert torch.equal(torch.from_numpy(np.asarray(back, dtype=np.float32)), codes[name].dequantize()), name
    assert type(fm.head) is W.Dense and fm.fused is not None and fm.fused_head is None


def test_plain_grids_map_to_the_block_type_holding_them():
    """as_blocks: 4/5/8-bit plain grids on whole 32-blocks keep their values; other grids say why they have no kernel."""
    from slmkit.compress.qgrid import Grid, quantize_rtn
    from slmkit.runtime.packedfast import as_blocks

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    for grid, want in [(Grid(4, 64, False), "Q4_1"), (Grid(5, 32, True), "Q5_0"), (Grid(5, 128, False), "Q5_1"),
                       (Grid(8, 0, True), "Q8_0"), (Grid(4, 0, True), "Q4_0")]:
        qt = quantize_rtn(w, grid)
        qtype, raw = as_blocks(qt)
        assert gguf.GGMLQuantizationType(qtype).name == want, grid
        back = np.asarray(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(qtype)), dtype=np.float32)
        assert torch.equal(torch.from_numpy(back), qt.dequantize()), grid
    assert "3-bit" in as_blocks(quantize_rtn(w, Grid(3, 128, True)))
    assert "groups of 16" in as_blocks(quantize_rtn(w, Grid(4, 16, True)))
    assert "Q2_K" in as_blocks(quantize_rtn(torch.randn(8, 256), Grid.for_gguf("Q2_K")))
    assert "multiple of 64" in as_blocks(quantize_rtn(torch.randn(8, 96), Grid(4, 32, True)))


def test_grids_without_a_kernel_run_dequantised_and_say_so(tiny_tok, tmp_path, caplog):
    """A Q2_K mix: Q2_K/Q3_K weights run as their dequantised codes (one warning line per grid, naming it and a
    tensor), the Q6_K embedding/head in the kernels; the model still follows transformers on the same codes."""
    from slmkit.compress.qgrid import Grid

    path = _write(_tiny(tiny_tok, seed=9), tiny_tok, tmp_path / "rtn-q2k", "rtn", Grid.for_gguf("Q2_K"), "Q2_K")
    with caplog.at_level(logging.WARNING, logger="slmkit.runtime.packedfast"):
        fm, model, tok = _fast(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "slmkit.runtime.packedfast"]
    assert any("Q2_K" in m for m in lines) and all("\n" not in m and "model.layers." in m for m in lines)
    held = _held(fm)
    dense = [n for n, m in held.items() if type(m) is W.Dense]
    assert dense and isinstance(fm.head, W.GGUFQ) and fm.head.qtype == int(gguf.GGMLQuantizationType.Q6_K)
    for n in dense:  # the dequantised codes, not re-rounded
        assert torch.equal(held[n].w, dict(model.named_parameters())[n].detach().to(torch.bfloat16)), n
    _follows_transformers(fm, model, tok)


def test_an_awq_dir_runs_its_codes_and_follows_transformers(tiny_tok, tmp_path):
    """AWQ (asymmetric 4-bit, groups of 64; its scales folded into the norms): Q4_1 blocks, the fused step, and
    the same next-token distributions as transformers on the directory's dequantised codes."""
    from slmkit.compress.qgrid import Grid

    path = _write(_tiny(tiny_tok, hidden=128), tiny_tok, tmp_path / "awq", "awq", Grid(4, 64, False))
    fm, model, tok = _fast(path)
    assert all(isinstance(m, W.GGUFQ) and m.qtype == int(gguf.GGMLQuantizationType.Q4_1) for m in _held(fm).values())
    assert fm.fused is not None
    _follows_transformers(fm, model, tok)


def _follows_transformers(fm, model, tok) -> None:
    """Teacher-forced on transformers' greedy text (16 tokens of each prompt): KL(ref || fast) max 0.05, mean 0.01."""
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids[0]
        seq = model.generate(ids[None], max_new_tokens=16, do_sample=False)[0]
        with torch.no_grad():
            want = torch.log_softmax(model(seq[None]).logits[0, len(ids) - 1 : -1].float(), -1)
        cache = fm.new_cache(context=64)
        got = [G.prefill(fm, ids, cache)] + [G.decode_one_token(fm, t, cache) for t in seq[len(ids) : -1].tolist()]
        got = torch.log_softmax(torch.stack(got), -1)
        kl = (want.exp() * (want - got)).sum(-1)
        assert float(kl.max()) < 0.05 and float(kl.mean()) < 0.01, (prompt, float(kl.max()), float(kl.mean()))


def test_a_dir_without_any_kernel_grid_runs_its_dequantised_codes(tiny_tok, tmp_path, caplog):
    from slmkit.compress.qgrid import Grid
    from slmkit.runtime.gguffast import file_codes

    path = _write(_tiny(tiny_tok, hidden=128), tiny_tok, tmp_path / "rtn-3bit", "rtn", Grid(3, 128, True))
    with caplog.at_level(logging.WARNING, logger="slmkit.runtime.gguffast"):
        assert file_codes(str(path), None) is None
    assert any("3-bit" in r.getMessage() and "rtn-3bit" in r.getMessage() for r in caplog.records)


def test_a_packed_draft_runs_its_codes_and_the_target_stays_exact(gptq_plain, tiny_tok):
    """``speculate --draft DIR``: the draft runs the directory's codes on the fast path; greedy output is the target's."""
    from slmkit.collab.drafters import FastDrafter, resolve_draft
    from slmkit.collab.speculative import SpecConfig, autoregressive, speculate

    target = _tiny(tiny_tok)  # the model the directory was quantised from
    draft = resolve_draft(str(gptq_plain), target, tiny_tok)
    assert isinstance(draft, FastDrafter) and isinstance(draft.fm.layers[0].o, W.GGUFQ)
    ids = tiny_tok(PROMPTS[0], return_tensors="pt").input_ids[0]
    cfg = SpecConfig(max_new_tokens=20, adaptive=False)  # draft every step (the controller may decode plainly on tiny models)
    out = speculate(target, draft, ids, cfg)
    assert out.tokens == autoregressive(target, ids, cfg).tokens and out.accepted > 0


def test_a_dense_head_after_the_fused_step(tiny_tok, tmp_path):
    """A GGUF file with an F16 embedding (``--embedding-type F16``): the fused step's hidden state goes through the
    dense bf16 head as the per-op path's does (it used to be an fp32/bf16 dtype error)."""
    import dataclasses

    from slmkit.export.gguf import export_gguf

    path = export_gguf(_tiny(tiny_tok, hidden=128), tiny_tok, tmp_path / "q4-f16emb.gguf", "Q4_0", embedding_type="F16")
    fm, _, tok = _fast(path)
    assert type(fm.head) is W.Dense and fm.fused is not None
    per_op = dataclasses.replace(fm, fused=None)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids[0]
    a, b = fm.new_cache(context=32), per_op.new_cache(context=32)
    G.prefill(fm, ids, a), G.prefill(per_op, ids, b)
    for t in (7, 11, 19):
        x, y = G.decode_one_token(fm, t, a), G.decode_one_token(per_op, t, b)
        # the per-op path keeps the residual stream in bf16, the fused step in fp32: measured 1.7-2.2% of the
        # logits' norm apart; bound 5%
        assert float((x - y).norm() / y.norm()) < 0.05 and int(x.argmax()) == int(y.argmax()), float((x - y).norm() / y.norm())


# ---------------------------------------------------------------------------- bad GGUF input to --fast


def _with_architecture(src: Path, dst: Path, arch: str) -> Path:
    """``src`` rewritten with ``general.architecture = arch`` (its ``llama.*`` keys renamed to ``arch.*``)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        name = f.name.replace("llama.", arch + ".", 1)
        kind = f.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), kind)
    for t in r.tensors:
        data = np.asarray(t.data)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _fails(capsys, path: Path, *extra: str) -> str:
    from slmkit.cli import main

    assert main(["generate", str(path), "The cat", "--raw", "--fast", "--max-new-tokens", "4", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 2 and "Traceback" not in err, err
    return err


def test_fast_on_a_gguf_type_without_a_kernel_exits_2_naming_it(tiny_tok, tmp_path, capsys):
    """A Q2_K file (Q2_K, Q3_K, Q4_K and Q6_K tensors): refused before the weights load, naming the types
    (issue 15: exit 2, the type named); --dtype fp32 runs its dequantised weights."""
    from slmkit.cli import main
    from slmkit.export.gguf import export_gguf

    path = export_gguf(_tiny(tiny_tok), tiny_tok, tmp_path / "tiny-Q2_K.gguf", "Q2_K")
    err = _fails(capsys, path)
    assert "Q2_K" in err and "Q3_K" in err and path.name in err and "--dtype fp32" in err
    assert main(["generate", str(path), "The cat", "--raw", "--fast", "--dtype", "fp32", "--max-new-tokens", "4"]) == 0


def test_fast_on_an_unknown_architecture_warns_and_runs_transformers(tiny_tok, tmp_path, capsys, caplog):
    """Issue 21: an architecture the fast path does not describe gives one warning line naming it, and the
    output is transformers' own (the same text as without --fast)."""
    import json
    import logging

    from slmkit.cli import main
    from slmkit.export.gguf import export_gguf
    from slmkit.runtime.gguffast import file_codes

    q4 = export_gguf(_tiny(tiny_tok, hidden=128), tiny_tok, tmp_path / "tiny-Q4_0.gguf", "Q4_0")
    path = _with_architecture(q4, tmp_path / "tiny-mamba.gguf", "mamba")
    args = ["generate", str(path), "The cat", "--raw", "--max-new-tokens", "4", "--json"]
    with caplog.at_level(logging.WARNING, logger="slmkit"):
        assert main([*args, "--fast"]) == 0
    fast = json.loads(capsys.readouterr().out)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("slmkit") and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'mamba'" in warned[0] and "\n" not in warned[0], warned
    assert main(args) == 0
    assert fast["text"] == json.loads(capsys.readouterr().out)["text"]
    assert file_codes(str(path), None, require_fast=False) is None  # serve / --draft: transformers runs it


def test_fast_on_a_truncated_gguf_exits_2_naming_the_file(tiny_tok, tmp_path, capsys):
    from slmkit.export.gguf import export_gguf

    q4 = export_gguf(_tiny(tiny_tok, hidden=128), tiny_tok, tmp_path / "tiny-Q4_0.gguf", "Q4_0")
    data = q4.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in (len(data) // 2, len(data) - 100):  # inside the tensor data, and its last block
        cut.write_bytes(data[:n])
        err = _fails(capsys, cut)
        assert str(cut) in err and "truncated" in err

"""GGUF grids for every llama.cpp block type: llama.cpp's fits, exact blocks, storage, bad input."""

from __future__ import annotations

import ctypes
import hashlib
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from slmkit.compress.qgrid import (
    GGUF_GRIDS,
    GGUF_TYPES,
    KQUANT_GRIDS,
    Grid,
    QTensor,
    encode_gguf_blocks,
    fit_params,
    gguf_fallback,
    quantize_rtn,
)
from slmkit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = list(GGUF_TYPES)
BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5,
       "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


def _weights(seed=0, out=12, n=512) -> torch.Tensor:
    """Gaussian rows plus the blocks that break scale searches."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, :256] = 0.03  # constant positive
    w[2, :256] = -0.02  # constant negative
    w[3] = w[3].abs()  # all positive
    w[4, :256] *= 1e-7  # huge dynamic range: one large weight among tiny ones
    w[4, 3] = 3.0
    w[5, 32:64] = 0.0  # zero sub-blocks inside a super-block
    w[5, 300:316] = 0.0
    w[6, ::7] *= 40  # outliers
    w[7] = -w[7].abs()  # all negative
    w[8, :16] = 1e-20  # below GROUP_MAX_EPS
    # exact rounding ties (power-of-two scales, weights on half steps): roundf vs round-half-even
    half = torch.arange(32) - 15.5  # -15.5 .. 15.5
    w[8, 256:288] = half / 128  # Q8_0: d = (127/128)/127 = 1/128 once the extreme is set
    w[8, 256] = 127 / 128
    w[8, 288:320] = (half.clamp(-7.5, 6.5)) / 8  # Q4_0: d = -1/-8 = 1/8
    w[8, 288] = -1.0
    w[8, 320:352] = half / 16  # Q5_0: d = -1/-16
    w[8, 320] = -1.0
    w[8, 352:384] = (half + 15.5).clamp(max=14.5) / 16  # Q4_1: min 0, max 15/16, d = 1/16
    w[8, 353] = 15 / 16
    return w


def _importance(n=512, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(n, generator=g) ** 4 * 10
    imp[:64] = 0.0  # dead input columns
    return imp


def _ggml_quantize():
    """llama.cpp's own ``ggml_quantize_chunk`` (from a scripts/build_llamacpp.sh build), or None."""
    from slmkit.export.llamacpp import bin_dir

    path = bin_dir() / "libggml-base.so"
    if not path.is_file():
        return None
    f = ctypes.CDLL(str(path)).ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]

    def quantize(w: np.ndarray, qtype: str, imp: np.ndarray | None) -> np.ndarray:
        t = gguf.GGMLQuantizationType[qtype]
        block, nbytes = gguf.GGML_QUANT_SIZES[t]
        w = np.ascontiguousarray(w, dtype=np.float32)
        dst = np.zeros((w.shape[0], w.shape[1] // block * nbytes), np.uint8)
        imp = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
        f(int(t), w.ctypes.data, dst.ctypes.data, 0, w.shape[0], w.shape[1], None if imp is None else imp.ctypes.data)
        return dst

    return quantize


GGML = _ggml_quantize()


@pytest.mark.parametrize("with_imp", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_reader_decodes_our_blocks_exactly(qtype, with_imp):
    w = _weights()
    grid = Grid.for_gguf(qtype)
    q = quantize_rtn(w, grid, importance=_importance() if with_imp else None)
    assert int(q.codes.min()) >= grid.qmin and int(q.codes.max()) <= grid.qmax
    raw = encode_gguf_blocks(q)
    t = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    assert block == grid.super_size and raw.shape == (12, 512 // block * nbytes) and raw.dtype == np.uint8
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(raw, t)), q.dequantize())
    # and it is a quantisation of w (on the plain Gaussian rows and live columns; the adversarial
    # rows may lose a lot, and the imatrix path ignores columns of importance 0)
    assert (q.dequantize()[9:, 64:] - w[9:, 64:]).abs().max() < 0.1


@pytest.mark.parametrize("qtype", list(GGUF_GRIDS))
def test_legacy_bytes_are_the_reference_quantisers(qtype):
    w = _weights(seed=2)
    raw = encode_gguf_blocks(quantize_rtn(w, Grid.for_gguf(qtype)))
    assert np.array_equal(raw, gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype]))


@pytest.mark.skipif(GGML is None, reason="llama.cpp is not built (scripts/build_llamacpp.sh)")
@pytest.mark.parametrize("with_imp", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_llama_cpp(qtype, with_imp):
    # what llama-quantize writes (with --imatrix: the same importance), byte for byte
    w = torch.cat([_weights(seed=3), torch.randn(20, 512, generator=torch.Generator().manual_seed(4)) * 0.02])
    imp = _importance() if with_imp else None
    ours = encode_gguf_blocks(quantize_rtn(w, Grid.for_gguf(qtype), importance=imp))
    assert np.array_equal(ours, GGML(w.numpy(), qtype, None if imp is None else imp.numpy()))


#: sha256[:16] of the blocks llama.cpp 0.3.36's ggml_quantize_chunk writes for :func:`_pinned` (checked
#: against the library when pinned), so the exactness is tested where llama.cpp is not built too
PINNED = {
    "Q8_0-ref": "b4d3c0a2f5acf7d6", "Q8_0-imatrix": "b4d3c0a2f5acf7d6", "Q5_1-ref": "40e7b1f5fd0ee851",
    "Q5_1-imatrix": "38928341ce72692b", "Q5_0-ref": "da4795407e6b45d0", "Q5_0-imatrix": "f8658f382a6c03c4",
    "Q4_0-ref": "ba1e9ff7c7dabbe7", "Q4_0-imatrix": "e9bbb26176d35ce4", "Q4_1-ref": "a8d7713f64d3ddfe",
    "Q4_1-imatrix": "f84319a4c6bcb766", "Q6_K-ref": "b1c935ab2f952bfa", "Q6_K-imatrix": "6108e1cbde7496e6",
    "Q5_K-ref": "8dbc7be670a5499a", "Q5_K-imatrix": "e8a6aa6684f54d4c", "Q4_K-ref": "e00ffb7b060291d1",
    "Q4_K-imatrix": "b71eee627e13d80c", "Q3_K-ref": "0fae174bf789a422", "Q3_K-imatrix": "84d898676347c7ab",
    "Q2_K-ref": "45b3a3a6d3b4be42", "Q2_K-imatrix": "7d069840deb71025",
}


def _pinned() -> tuple[torch.Tensor, torch.Tensor]:
    """(16, 512) heavy-tailed weights and an importance vector from integer hashes (no RNG, no libm)."""
    i, j = np.arange(16, dtype=np.int64)[:, None], np.arange(512, dtype=np.int64)[None, :]
    u = ((i * 1103515245 + j * 12345 + 6789) % 2147483648).astype(np.float64) / 2147483648
    v = ((i * 69069 + j * 1013904223 + 1) % 4294967296).astype(np.float64) / 4294967296
    w = ((u - 0.5) / (0.05 + v) * 0.004).astype(np.float32)
    imp = ((((np.arange(512) * 2654435761) % 1000) / 1000.0) ** 4).astype(np.float32)
    return torch.from_numpy(w), torch.from_numpy(imp)


@pytest.mark.parametrize("with_imp", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_pinned_llama_cpp_output(qtype, with_imp):
    w, imp = _pinned()
    raw = encode_gguf_blocks(quantize_rtn(w, Grid.for_gguf(qtype), importance=imp if with_imp else None))
    if GGML is not None:  # the pin is what the library writes
        assert np.array_equal(raw, GGML(w.numpy(), qtype, imp.numpy() if with_imp else None))
    assert hashlib.sha256(raw.tobytes()).hexdigest()[:16] == PINNED[f"{qtype}-{'imatrix' if with_imp else 'ref'}"]


def test_sqrt_is_correctly_rounded_like_sqrtf():
    # torch's fp32 sqrt can be 1 ulp off; llama.cpp's imatrix weights use sqrtf (IEEE, correctly rounded)
    from slmkit.compress.kquant import _sqrt

    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    assert np.array_equal(_sqrt(x).numpy(), np.sqrt(x.numpy()))


@pytest.mark.parametrize("qtype", list(KQUANT_GRIDS))
def test_kquant_scales_are_the_stored_integers(qtype):
    grid = Grid.for_gguf(qtype)
    w = _weights(seed=5)
    scales, mins, aux = fit_params(w, grid)
    per = grid.super_size // grid.group_size
    assert scales.dtype == torch.float32 and scales.shape == (12, 512 // grid.group_size)
    assert aux["d"].dtype == torch.float16 and aux["d"].shape == (12, 2)
    assert torch.equal(scales, aux["d"].float().repeat_interleave(per, 1) * aux["sc"].float())
    lim = {"Q6_K": (-128, 127), "Q3_K": (-32, 31), "Q2_K": (0, 15)}.get(qtype, (0, 63))
    assert int(aux["sc"].min()) >= lim[0] and int(aux["sc"].max()) <= lim[1]
    if grid.symmetric:
        assert mins is None and set(aux) == {"d", "sc"}
    else:
        assert torch.equal(mins, -(aux["dmin"].float().repeat_interleave(per, 1) * aux["m"].float()))
        assert int(aux["m"].max()) <= lim[1]
    # RTN codes are the nearest on those scales (sub-blocks with a zero scale: any code decodes the same)
    q = quantize_rtn(w, grid)
    s = scales.repeat_interleave(grid.group_size, 1)
    m = 0.0 if mins is None else mins.repeat_interleave(grid.group_size, 1)
    near = torch.round((w - m) / s).clamp(grid.qmin, grid.qmax)
    live = s != 0
    assert torch.equal(q.codes.float()[live], near[live])


def test_kquants_beat_legacy_types_at_equal_or_lower_bits():
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(6)) * 0.05
    mse = {t: float(((quantize_rtn(w, Grid.for_gguf(t)).dequantize() - w) ** 2).mean()) for t in TYPES}
    assert mse["Q4_K"] < 0.8 * mse["Q4_0"] and mse["Q4_K"] < mse["Q4_1"]  # 4.5 bpw vs 4.5 / 5.0
    assert mse["Q5_K"] < 0.8 * mse["Q5_0"] and mse["Q5_K"] < mse["Q5_1"]  # 5.5 vs 5.5 / 6.0
    assert mse["Q6_K"] < 0.3 * mse["Q5_K"]
    ks = sorted(KQUANT_GRIDS, key=BPW.get)
    assert [mse[t] for t in ks] == sorted((mse[t] for t in ks), reverse=True)  # more bits, less error


@pytest.mark.parametrize("grid", [Grid.for_gguf(t) for t in TYPES if t != "Q8_0"]
                         + [Grid(4, 32), Grid(3, 64, symmetric=False), Grid(5, 0)], ids=str)
def test_importance_lowers_the_weighted_error(grid):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 512, generator=g) * 0.05
    imp = torch.full((512,), 0.01)
    imp[torch.randperm(512, generator=g)[:12]] = 100.0  # a few columns that matter

    def err(q: QTensor) -> float:
        return float(((q.dequantize() - w) ** 2 * imp).sum())

    plain, weighted = err(quantize_rtn(w, grid)), err(quantize_rtn(w, grid, importance=imp))
    assert weighted < (0.9 if grid.group_size == 0 else 0.5) * plain


@pytest.mark.parametrize("grid", [Grid.for_gguf("Q4_0"), Grid.for_gguf("Q5_1"), Grid.for_gguf("Q4_K"),
                                  Grid.for_gguf("Q6_K"), Grid(4, 32), Grid(3, 64, symmetric=False)], ids=str)
def test_fitting_column_slices_reproduces_the_full_fit(grid):
    # GPTQ fits one group (a super-block for k-quants) at a time; with the full rows' sigma2 that is the same fit
    from slmkit.compress.kquant import row_sigma2

    w, imp = _weights(seed=10), _importance()
    full = fit_params(w, grid, imp)
    k = grid.super_size
    parts = [fit_params(w[:, c : c + k], grid, imp[c : c + k], row_sigma2=row_sigma2(w)) for c in range(0, 512, k)]
    for i in (0, 1):
        assert (full[i] is None) == (parts[0][i] is None)
        assert full[i] is None or torch.equal(torch.cat([p[i] for p in parts], 1), full[i])
    if full[2] is not None:
        assert all(torch.equal(torch.cat([p[2][key] for p in parts], 1), v) for key, v in full[2].items())
    if not grid.kquant:  # without it, a slice's own mean square weights differently
        alone = torch.cat([fit_params(w[:, c : c + k], grid, imp[c : c + k])[0] for c in range(0, 512, k)], 1)
        assert not torch.equal(alone, full[0])


def test_q8_0_ignores_importance_like_llama_cpp():
    w = _weights()
    a, b = quantize_rtn(w, Grid.for_gguf("Q8_0")), quantize_rtn(w, Grid.for_gguf("Q8_0"), importance=_importance())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("qtype", ["Q5_1", *KQUANT_GRIDS])
def test_codes_survive_qstore(tmp_path, qtype):
    from transformers import PretrainedConfig

    from slmkit.artefact import Manifest
    from slmkit.compress.qstore import PACKED, read_packed, save_quantized

    grid = Grid.for_gguf(qtype)
    model = torch.nn.Linear(512, 12)
    model.config = PretrainedConfig()
    q = quantize_rtn(_weights(seed=8), grid, importance=_importance())
    done = SimpleNamespace(grid=grid, method="rtn", tensors={"weight": q})
    save_quantized(model, None, done, tmp_path / "m", Manifest(source="test"))
    plain, back, grid2, method = read_packed(tmp_path / "m" / PACKED)
    assert grid2 == grid and set(plain) == {"bias"} and set(back) == {"weight"}
    r = back["weight"]
    assert torch.equal(r.codes, q.codes) and r.scales.dtype == q.scales.dtype and torch.equal(r.scales, q.scales)
    assert (r.mins is None) == (q.mins is None) and (r.mins is None or torch.equal(r.mins, q.mins))
    assert (r.aux is None) == (q.aux is None)
    for k, v in (q.aux or {}).items():
        assert r.aux[k].dtype == v.dtype and torch.equal(r.aux[k], v)
    assert torch.equal(r.dequantize(), q.dequantize())
    assert np.array_equal(encode_gguf_blocks(r), encode_gguf_blocks(q))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q2_K"])
def test_row_permutation_keeps_the_blocks(qtype):
    q = quantize_rtn(_weights(seed=9), Grid.for_gguf(qtype))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(encode_gguf_blocks(q.map_rows(lambda t: t[perm])), encode_gguf_blocks(q)[perm.numpy()])


def test_grids_of_each_type():
    for t, (bits, sym, g, sup) in GGUF_TYPES.items():
        grid = Grid.for_gguf(t)
        assert (grid.bits, grid.symmetric, grid.group_size, grid.super_size) == (bits, sym, g, sup)
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == sup
    assert (Grid.for_gguf("Q6_K").qmin, Grid.for_gguf("Q6_K").qmax) == (-32, 31)
    assert (Grid.for_gguf("Q3_K").qmin, Grid.for_gguf("Q3_K").qmax) == (-4, 3)
    assert (Grid.for_gguf("Q2_K").qmin, Grid.for_gguf("Q2_K").qmax) == (0, 3)
    assert Grid(4, 64).super_size == 64 and not Grid(4, 64).kquant and Grid.for_gguf("Q4_K").kquant
    # llama-quantize's fallbacks for rows that are not whole super-blocks (576 = 2.25 * 256)
    assert [gguf_fallback(t, 576) for t in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q4_0")] == \
        ["Q8_0", "Q5_1", "Q5_0", "Q4_0", "Q4_0", "Q4_0"]
    assert gguf_fallback("Q4_K", 1536) == "Q4_K" and gguf_fallback("Q4_K", 48) == "F16"


def test_bad_input():
    with pytest.raises(ConfigError, match="not a multiple of 256"):
        fit_params(torch.zeros(4, 576), Grid.for_gguf("Q4_K"))
    with pytest.raises(ConfigError, match="clip is not supported"):
        quantize_rtn(torch.zeros(4, 256), Grid.for_gguf("Q6_K"), clip=torch.ones(4, 16))
    with pytest.raises(ConfigError, match="cannot be combined"):
        fit_params(torch.zeros(4, 64), Grid.for_gguf("Q4_0"), importance=torch.ones(64), clip=torch.ones(4, 2))
    with pytest.raises(ConfigError, match="importance has 32 entries"):
        fit_params(torch.zeros(4, 64), Grid.for_gguf("Q4_0"), importance=torch.ones(32))
    with pytest.raises(ConfigError, match="Q6_K needs bits=6, group_size=16"):
        Grid(6, 32, gguf="Q6_K")
    with pytest.raises(ConfigError, match=r"(?s)unsupported bits 2.*Q2_K"):
        Grid(bits=2)
    q = quantize_rtn(_weights(), Grid.for_gguf("Q4_K"))
    with pytest.raises(ConfigError, match="no super-block integers"):
        encode_gguf_blocks(QTensor(q.codes, q.scales, q.mins, q.grid))
    with pytest.raises(ConfigError, match="not d\\*sc"):
        encode_gguf_blocks(QTensor(q.codes, q.scales * 1.001, q.mins, q.grid, q.aux))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_0"])
def test_fit_under_bf16_autocast_equals_fp32_fit(qtype):
    """QAT fits inside the trainer's bf16 autocast; a matrix split into several row chunks concatenates the
    chunks' fp16 super-block scales, which autocast's torch.cat rejected on CPU. The fit must not notice autocast."""
    from slmkit.compress.kquant import CHUNK, fit

    torch.manual_seed(0)
    w = torch.randn(2 * CHUNK // 256 + 3, 256)  # three row chunks
    ref = fit(w, qtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fit(w, qtype)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
    assert (got.aux is None) == (ref.aux is None)
    for k in ref.aux or {}:
        assert got.aux[k].dtype == ref.aux[k].dtype and torch.equal(got.aux[k], ref.aux[k])

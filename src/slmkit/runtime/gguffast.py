"""A GGUF file's own quantised weights on the fast path: no dequantise-then-re-quantise round trip.

transformers' GGUF loader dequantises every tensor (:func:`slmkit.models.load`); the fast path's
``int4``/``int8`` options would then round those values again onto slmkit's own grids.
:func:`build_gguf` instead takes config, norms, rotary and tokenizer-facing facts from the
loaded model but every quantised matrix from the file's raw blocks, which
:mod:`slmkit.runtime.ggmlkernel` multiplies as they are (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K; llama.cpp's mixes such as Q4_K_M combine several in one file). F32/F16/BF16 tensors stay
dense (bf16). llama.cpp stores a ``llama`` file's attn_q/attn_k rows permuted for its rotary layout
(other architectures, e.g. ``gemma3``, ``qwen2``, keep transformers' order); whole rows of blocks are
moved back (rows are independent, so this is lossless). A tied output head multiplies with the
embedding table's blocks and the embedding lookup dequantises the rows it needs.

The files' own codes run for the GGUF architectures in :data:`OWN_CODES` (their tensors have the
llama names :func:`slmkit.export.gguf.gguf_name` maps); another architecture the fast path describes
(e.g. ``phi3``, whose q/k/v are one ``attn_qkv`` tensor) runs its dequantised weights, with a warning,
and one it does not describe runs through transformers, with a warning.

A slmkit packed quantised directory (GPTQ/AWQ/RTN codes, QAT codes) runs its own codes the same way
(:mod:`slmkit.runtime.packedfast`); :func:`build_gguf` and :func:`file_codes` take either.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import ConfigError, CorruptModelError, UnsupportedModelError
from slmkit.runtime import ggmlkernel, q4kernel
from slmkit.runtime.arch import text_config
from slmkit.runtime.generate import SUPPORTED, FastConfig, FastModel, build, runner
from slmkit.runtime.weights import Dense, GGUFExact, GGUFQ

log = logging.getLogger(__name__)

DENSE_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  #: ggml types kept as dense bf16 matrices
#: GGUF general.architecture values whose own quantised blocks run (tensor names as gguf_name maps them)
OWN_CODES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
#: GGUF architectures whose attn_q/attn_k rows llama.cpp's converter permutes (LlamaModel.modify_tensors)
PERMUTED_QK = ("llama",)


def _type_name(qtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def is_quantised(path: str | Path) -> bool:
    """Whether a GGUF file holds any quantised (not F32/F16/BF16) tensor."""
    import gguf

    return any(int(t.tensor_type) not in DENSE_TYPES for t in gguf.GGUFReader(str(path)).tensors)


def _unpermute_rows(raw: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order of Q/K (whole rows of blocks; see export.gguf.permute_qk)."""
    from slmkit.export.gguf import unpermute_qk

    return unpermute_qk(raw, n_head).contiguous()


class CodesMismatchError(ConfigError):
    """``weights="gguf-f32"`` was asked of a model whose weights are not the file's dequantised codes."""


def _same_codes(path: Path, hf_name: str, name: str, made_w: Dense, weight: torch.Tensor) -> Dense:
    """gguf-f32: ``made_w`` (tensor ``name`` of the file) is ``weight`` (the model's ``hf_name``) bit for bit, else
    :class:`CodesMismatchError`."""
    values = made_w.dequantised() if isinstance(made_w, GGUFExact) else made_w.w
    if not torch.equal(values, weight.detach().float()):
        raise CodesMismatchError(f"{path.name}: {hf_name} of the model is not the dequantised {name} of the file")
    return made_w


def build_gguf(path: str | Path, cfg: FastConfig = FastConfig(), model=None) -> FastModel:
    """The fast model of GGUF file ``path`` running the file's own quantised blocks.

    ``cfg.weights="gguf-f32"``: the blocks in full precision (fp32 activations; every weight dequantised on the fly
    exactly as gguf-py does), so the weights are those of ``model`` loaded from the file, at a seventh of the
    bytes (the sums follow ``kernels/f32.c``'s order); each matrix is checked bit for bit against ``model``'s
    (:class:`CodesMismatchError` when one differs, e.g. a model changed after loading).

    ``model`` is the file loaded by :func:`slmkit.models.load` (loaded here when omitted); it
    supplies config, norms and rotary, and the values of dense tensors. ``cfg.kernel`` is kept;
    the compute dtype is bf16 (the fused decode step's cache), fp32 with ``gguf-f32``. Raises
    :class:`~slmkit.errors.UnsupportedModelError` naming the tensor when one is quantised in a
    format the kernels do not read, and :class:`~slmkit.errors.ConfigError` when the kernel
    library is unavailable or ``cfg`` asks for re-quantisation or torch.compile.

    ``path`` may also be a packed quantised directory: its own codes run
    (:func:`slmkit.runtime.packedfast.build_packed`; weights whose grid has no kernel run dequantised,
    with a warning).
    """
    import gguf

    path = Path(path)
    exact = cfg.weights == "gguf-f32"
    if cfg.weights in ("int4", "int8"):
        raise ConfigError(f"weights={cfg.weights!r} re-quantises; a quantised file's own codes run as they are (weights='gguf')")
    if cfg.compile:
        raise ConfigError("compile=True cannot trace slmkit's GGUF kernel (a ctypes call)")
    if q4kernel.load() is None:
        raise ConfigError(f"slmkit's kernel library is unavailable ({q4kernel.why_unavailable()})",
                          "run with --dtype fp32 (or bf16) to use the dequantised weights")
    if model is None:
        from slmkit.models import load

        model, _ = load(str(path))
    if path.is_dir() and exact:
        raise ConfigError("weights='gguf-f32' runs a GGUF file's blocks; a packed directory runs with weights='gguf'")
    if path.is_dir():
        from slmkit.runtime.packedfast import build_packed

        return build_packed(path, cfg, model)
    from slmkit.export.gguf import gguf_name

    c = text_config(model.config)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    permuted = _architecture(reader) in PERMUTED_QK
    made: dict[str, Dense] = {}
    sources: list[tuple[int, GGUFExact]] = []  # gguf-f32: (the model's weight, its blocks), for exact_model's checks

    def weights(hf_name: str, mod: torch.nn.Module) -> Dense:
        name = gguf_name(hf_name + ".weight")
        if hf_name == "lm_head" and "output.weight" not in tensors:
            name = "token_embd.weight"  # a tied head is the embedding table
        if name in made:
            if exact:  # a tied head: the model's head must be the same table
                _same_codes(path, hf_name, name, made[name], mod.weight)
            return made[name]
        t = tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"{path.name}: no tensor {name} for {hf_name}")
        w = mod.weight.detach()
        n, k = w.shape
        if [int(v) for v in reversed(t.shape.tolist())] != [n, k]:
            raise UnsupportedModelError(f"{path.name}: tensor {name} has shape {t.shape.tolist()[::-1]}, the model expects {[n, k]}")
        qtype = int(t.tensor_type)
        bias = getattr(mod, "bias", None)
        bias = None if bias is None else bias.detach().to(torch.float32 if exact else torch.bfloat16)
        if qtype in DENSE_TYPES:
            made[name] = Dense(w.to(torch.float32 if exact else torch.bfloat16), bias)
        elif qtype not in ggmlkernel.TYPES:
            supported = ", ".join(v[0] for v in ggmlkernel.TYPES.values())
            raise UnsupportedModelError(
                f"{path.name}: tensor {name} is {_type_name(qtype)}, which slmkit's GGUF kernels do not read (they read {supported})",
                "run with --dtype fp32 (or bf16) to use the dequantised weights",
            )
        elif ggmlkernel.row_bytes(qtype, k) is None:
            log.warning("%s: %s (%s) has %d inputs, not a multiple of 64: it runs dequantised", path.name, name, _type_name(qtype), k)
            made[name] = Dense(w.to(torch.float32 if exact else torch.bfloat16), bias)
        else:
            raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1))  # (n, row bytes): a copy, not the mmap
            if permuted and hf_name.endswith("q_proj"):
                raw = _unpermute_rows(raw, c.num_attention_heads)
            elif permuted and hf_name.endswith("k_proj"):
                raw = _unpermute_rows(raw, c.num_key_value_heads)
            if exact:
                made[name] = _same_codes(path, hf_name, name, GGUFExact(raw, qtype, k, bias), mod.weight)
                sources.append((mod.weight.data_ptr(), made[name]))
            else:
                made[name] = GGUFQ(raw, qtype, k, bias)
        return made[name]

    fcfg = FastConfig(dtype="fp32", weights="gguf-f32") if exact else FastConfig(dtype="bf16", weights="gguf", kernel=cfg.kernel)
    fm = build(model, fcfg, weights)
    fm.exact_sources = sources
    kinds = sorted({_type_name(m.qtype) for m in made.values() if isinstance(m, GGUFQ)})
    log.info("%s on the fast path with the file's own %s blocks%s", path.name, "/".join(kinds) or "(no quantised)",
             "" if fm.fused is not None else " (per-op: the fused step does not cover this model)")
    return fm


def source_file(model) -> Path | None:
    """The GGUF file ``model`` was loaded from by :func:`slmkit.models.load` (a packaged model, a ``.gguf`` spec, or the
    cached conversion of one), or None. A guess from ``config.name_or_path``: :func:`build_gguf` with ``gguf-f32``
    checks the weights bit for bit before it uses the file."""
    from slmkit.artefact import Manifest
    from slmkit.errors import SlmkitError
    from slmkit.models import zoo
    from slmkit.models.load import resolve

    spec = str(getattr(model.config, "name_or_path", "") or "")
    if not spec:
        return None
    try:
        if spec in zoo.ZOO:
            return Path(zoo.locate(spec))
        src = resolve(spec)
    except (SlmkitError, OSError):
        return None
    if src.kind == "gguf":
        return Path(src.path) / src.gguf_file
    if src.kind == "dir":
        try:
            man = Manifest.read(src.path)
        except (OSError, ValueError, TypeError):
            return None
        if man is not None and [st.get("stage") for st in man.stages] == ["gguf-dequantise"] and Path(man.source).is_file():
            return Path(man.source)
    return None


#: model -> (its parameters' storage and version counters, the exact fast model or None, (weight, blocks) pairs)
_exact_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows_still_equal(pairs) -> bool:
    """Each matrix's first row still equal to its blocks' (a cache hit's check: ``p.data += d``, as an adapter merge
    does, changes no version counter)."""
    first = torch.tensor([0])
    return all(torch.equal(blocks.rows(first, torch.float32)[0], w.detach()[0]) for w, blocks in pairs)


def exact_model(model, cfg: FastConfig = FastConfig()) -> FastModel | None:
    """``model`` (fp32 on the CPU, loaded from a GGUF file) on the fast path with the file's own blocks in full
    precision (``weights="gguf-f32"``: its weights bit for bit, read at the file's size; sums in the fp32 kernel's
    order, which differs from torch's gemv/sgemm by fp32 rounding), or None when ``cfg`` asks for something else
    (bf16, quantised weights, torch.compile), it has no such file, the file's tensors have no kernel, or its weights
    are not the file's (changed after loading).

    Built once per model (a few seconds: the file's metadata and the bit-for-bit check of every matrix) and reused
    while no parameter was replaced or changed in place (torch's version counters) and every matrix's first row
    still equals its blocks' (a change through ``.data`` bumps no counter)."""
    if cfg.dtype != "fp32" or cfg.weights != "native" or cfg.compile:
        return None
    params = list(model.parameters())
    if params[0].dtype != torch.float32 or any(p.device.type != "cpu" for p in params) or q4kernel.load() is None:
        return None
    stamp = tuple((p.data_ptr(), p._version) for p in params)
    hit = _exact_built.get(model)
    if hit is not None and hit[0] == stamp and _rows_still_equal(hit[2]):
        return hit[1]
    fm, pairs, path = None, [], source_file(model)
    if path is not None:
        try:
            fm = build_gguf(path, FastConfig(dtype="fp32", weights="gguf-f32"), model)
        except (ConfigError, UnsupportedModelError, CorruptModelError) as e:
            log.info("%s: the full-precision path over its blocks does not apply (%s); dense fp32 weights run", path.name, e)
    if fm is not None:
        by_ptr = {p.data_ptr(): p for p in params}
        pairs = [(by_ptr[ptr], b) for ptr, b in fm.exact_sources if ptr in by_ptr]
    _exact_built[model] = (stamp, fm, pairs)
    return fm


def fast_runner(model, cfg: FastConfig = FastConfig()):
    """:func:`slmkit.runtime.generate.runner` (the fast path, or transformers' forward for an architecture it does not
    describe), except that an fp32 model loaded from a GGUF file runs that file's own blocks in full precision
    (:func:`exact_model`: the same weights read at the file's 4.5-8.5 bits instead of 32, sums in the fp32 kernel's
    order)."""
    return exact_model(model, cfg) or runner(model, cfg)


def file_codes(spec: str, dtype: str | None, weights: str = "native", require_fast: bool = True) -> Path | None:
    """The GGUF file or packed quantised directory whose own codes ``--fast`` should run for ``spec``, or None
    (the dequantised model).

    The CLI's rule: a spec naming a quantised GGUF file or a slmkit packed quantised directory
    (``slmkit quantize``, ``slmkit distill --qat``), with no ``--dtype`` given, runs its own codes; an
    explicit ``--dtype fp32``/``bf16`` runs the dequantised weights as before (and ``--int4``/``--int8``
    then re-quantise those). ``--int4``/``--int8`` without ``--dtype`` on such a spec is a
    :class:`~slmkit.errors.ConfigError`: they would round the file's (calibrated) codes a second time.

    Checked before any weight loads, so bad input fails fast with one line: a truncated or corrupt
    GGUF file (:class:`~slmkit.errors.CorruptModelError` naming it); a GGUF file or packed directory
    whose architecture the fast path does not describe returns None (the model runs through
    transformers; :func:`slmkit.runtime.arch.describe` names the architecture in one warning line when
    the fast model is built); a GGUF architecture
    the fast path describes but whose blocks it does not read (:data:`OWN_CODES`) returns None with a
    warning (the dequantised weights run); a quantised GGUF tensor in a type the kernels do not read
    (UnsupportedModelError naming the types). A packed directory none of whose weights has a kernel
    returns None with a warning (its dequantised codes run, as before). Where the kernel library is
    unavailable the dequantised weights run (with a warning). ``require_fast`` is accepted for callers that
    pass it (serve, --draft); an undescribed architecture returns None either way.
    """
    from slmkit.compress.qstore import is_quantized_dir
    from slmkit.models.load import check_gguf, resolve

    src = resolve(spec)
    if src.kind == "dir" and is_quantized_dir(src.path):
        return _packed_codes(Path(src.path), dtype, weights, require_fast)
    if src.kind != "gguf":
        return None
    path = Path(src.path) / src.gguf_file
    check_gguf(path)  # a truncated file: one line naming it
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _architecture(reader)
    if arch not in SUPPORTED:  # transformers runs it; building the fast model says so in one line (arch.describe)
        return None
    if dtype is not None:
        return None
    if arch not in OWN_CODES:
        log.warning("%s: the fast path does not read a %r file's own blocks (it does for %s): its dequantised weights run",
                    path.name, arch, ", ".join(OWN_CODES))
        return None
    quantised = [t for t in reader.tensors if int(t.tensor_type) not in DENSE_TYPES]
    if not quantised:
        return None
    if not _kernels_for_own_codes(path, weights, f"re-quantise the dequantised weights of {path.name}",
                                  "the file's own quantised blocks", "re-quantise the dequantised weights", "dequantised"):
        return None
    missing: dict[str, str] = {}  # type -> first tensor
    for t in quantised:
        if int(t.tensor_type) not in ggmlkernel.TYPES:
            missing.setdefault(_type_name(int(t.tensor_type)), t.name)
    if missing:
        supported = ", ".join(v[0] for v in ggmlkernel.TYPES.values())
        first = next(iter(missing.items()))
        raise UnsupportedModelError(
            f"{path.name} holds {' and '.join(missing)} tensors (e.g. {first[1]} is {first[0]}), which slmkit's "
            f"GGUF kernels do not read (they read {supported})",
            "run with --dtype fp32 (or bf16) to use the dequantised weights",
        )
    return path


def _kernels_for_own_codes(path: Path, weights: str, again: str, own: str, redo: str, fallback: str) -> bool:
    """Whether the fast path can run ``path``'s own codes (``own``): a ConfigError when ``weights`` (``int4``/``int8``)
    would round them again (``again`` says how, ``redo`` how to do it on purpose); False, with a warning that
    ``path`` runs ``fallback``, without the kernel library."""
    if weights != "native":
        raise ConfigError(f"--{weights} would {again}; --fast runs {own} without it",
                          f"drop --{weights}, or add --dtype fp32 to {redo} on purpose")
    if q4kernel.load() is None:
        log.warning("slmkit's kernel library is unavailable (%s): %s runs %s", q4kernel.why_unavailable(), path.name, fallback)
        return False
    return True


def _architecture(reader) -> str | None:
    f = reader.fields.get("general.architecture")
    return None if f is None else f.contents()


def _packed_codes(path: Path, dtype: str | None, weights: str, require_fast: bool) -> Path | None:
    """:func:`file_codes` for a packed quantised directory."""
    import json

    from slmkit.runtime.packedfast import plan

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise CorruptModelError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    if model_type not in SUPPORTED:  # transformers runs it (arch.describe warns when the fast model is built)
        return None
    if dtype is not None:
        return None
    if not _kernels_for_own_codes(path, weights, f"round {path.name}'s quantised codes a second time",
                                  "the directory's own codes", "re-round the dequantised codes", "its dequantised codes"):
        return None
    kinds = plan(path)
    if kinds and all(t is None for t, _ in kinds.values()):
        name, (_, why) = next(iter(kinds.items()))
        log.warning("%s: no quantised weight has a kernel (e.g. %s: %s): the dequantised codes run", path.name, name, why)
        return None
    return path

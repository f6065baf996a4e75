"""A slmkit packed quantised directory's own codes on the fast path (no re-rounding).

``slmkit quantize MODEL --method rtn|imatrix|gptq|awq --output DIR`` and ``slmkit distill --qat``
store every quantised weight as integer codes plus scales in ``DIR/quantized.safetensors``
(:mod:`slmkit.compress.qstore`). :func:`build_packed` runs those codes in the same GGUF kernels as a
GGUF file's blocks (:mod:`slmkit.runtime.ggmlkernel`, :class:`~slmkit.runtime.weights.GGUFQ`):
each :class:`~slmkit.compress.qgrid.QTensor` is written into llama.cpp blocks by
:func:`~slmkit.compress.qgrid.encode_gguf_blocks`, the function ``slmkit export`` writes a GGUF
file with, so the kernel reads the bytes that file would hold (q/k rows in transformers' order).

Which grids run in the kernels (:func:`kernel_type`):

* a GGUF grid the kernels read (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): its own blocks;
* a plain grid whose values a 32-block type holds exactly: 4/5/8-bit codes with fp16 scales (and
  fp16 offsets) per group of a multiple of 32 columns (or per channel) are Q4_0/Q5_0/Q8_0
  (symmetric) or Q4_1/Q5_1 (asymmetric) blocks with the group's scale repeated in each block:
  ``d * q (+ m)`` per block is the group's value, so nothing is rounded again;
* anything else (3-bit plain codes, Q2_K/Q3_K grids, groups that are not whole 32-blocks, rows whose
  width is not a multiple of 64) runs as the dequantised codes in bf16, with one warning line per
  grid naming the grid and a tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from slmkit.compress.qgrid import GGUF_BLOCK, Grid, QTensor, encode_gguf_blocks
from slmkit.compress.qstore import PACKED, read_packed
from slmkit.errors import CorruptModelError
from slmkit.runtime import ggmlkernel
from slmkit.runtime.generate import FastConfig, FastModel, build
from slmkit.runtime.weights import Dense, GGUFQ

log = logging.getLogger(__name__)

#: plain grid (bits, symmetric) -> the 32-block GGUF type whose blocks hold its values exactly
PLAIN_AS_GGUF = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}


def grid_name(grid: Grid) -> str:
    """A grid in words: ``Q4_K``, or ``4-bit symmetric, groups of 128``."""
    if grid.gguf is not None:
        return grid.gguf
    groups = f"groups of {grid.group_size}" if grid.group_size else "per channel"
    return f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'}, {groups}"


def kernel_type(grid: Grid, in_features: int) -> tuple[str | None, str]:
    """``(GGUF type, "")`` the kernels run a weight on ``grid`` with ``in_features`` inputs as, or ``(None, why not)``."""
    if grid.gguf is not None:
        t = grid.gguf
    else:
        t = PLAIN_AS_GGUF.get((grid.bits, grid.symmetric))
        if t is None:
            return None, f"no 32-block GGUF type holds {grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} codes"
        if grid.width(in_features) % GGUF_BLOCK:
            return None, f"groups of {grid.width(in_features)} are not whole {GGUF_BLOCK}-weight blocks"
    try:
        qtype = ggmlkernel.type_id(t)
    except KeyError:
        return None, f"slmkit's GGUF kernels do not read {t}"
    if ggmlkernel.row_bytes(qtype, in_features) is None:
        return None, f"rows of {in_features} inputs (the kernels need a multiple of 64)"
    return t, ""


def as_blocks(qt: QTensor) -> tuple[int, torch.Tensor] | str:
    """``(ggml type id, raw blocks (out, row bytes) uint8)`` holding exactly ``qt``'s values, or why it has none."""
    out, k = qt.codes.shape
    t, why = kernel_type(qt.grid, k)
    if t is None:
        return why
    q = qt
    if qt.grid.gguf is None:  # a plain grid: every 32-block of a group carries the group's fp16 scale (and offset)
        for name, v in (("scales", qt.scales), ("offsets", qt.mins)):
            if v is not None and not torch.equal(v.float().half().float(), v.float()):
                return f"its {name} are not fp16 values"
        rep = qt.grid.width(k) // GGUF_BLOCK
        mins = None if qt.mins is None else qt.mins.half().repeat_interleave(rep, 1)
        q = QTensor(qt.codes, qt.scales.half().repeat_interleave(rep, 1), mins, Grid.for_gguf(t))
    return ggmlkernel.type_id(t), torch.from_numpy(encode_gguf_blocks(q))


def plan(path: str | Path) -> dict[str, tuple[str | None, str]]:
    """Per quantised weight of the packed directory ``path`` (HF name): :func:`kernel_type`, from the file's
    metadata alone (no tensor is read)."""
    from safetensors import safe_open

    file = Path(path) / PACKED
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
        grid = Grid(**json.loads(meta["grid"]))
        own = {k: Grid(**v) for k, v in json.loads(meta.get("grids", "{}")).items()}
        shapes = json.loads(meta["shapes"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise CorruptModelError(f"cannot read {file}: {str(err).splitlines()[0]}", "quantise the model again") from None
    return {name: kernel_type(own.get(name, grid), shape[1]) for name, shape in shapes.items()}


def build_packed(path: str | Path, cfg: FastConfig, model) -> FastModel:
    """The fast model of packed quantised directory ``path`` running its own codes (see the module docstring).

    ``model`` is the directory loaded by :func:`slmkit.models.load` (the dequantised codes): it supplies
    config, norms, rotary, the unquantised matrices and the fallback of weights without a kernel.
    ``cfg`` is checked as :func:`slmkit.runtime.gguffast.build_gguf` checks it; compute is bf16.
    """
    path = Path(path)
    _, codes, _, method = read_packed(path / PACKED)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    made: dict[str, Dense] = {}
    dense: dict[tuple[str, str], list[str]] = {}  # (grid, why it has no kernel) -> weights run dequantised

    def weights(hf_name: str, mod: torch.nn.Module) -> Dense:
        name = "model.embed_tokens.weight" if hf_name == "lm_head" and tied else hf_name + ".weight"
        if name in made:
            return made[name]
        bias = getattr(mod, "bias", None)
        bias = None if bias is None else bias.detach().to(torch.bfloat16)
        qt = codes.get(name)
        blocks = as_blocks(qt) if qt is not None else None
        if isinstance(blocks, tuple):
            made[name] = GGUFQ(blocks[1], blocks[0], qt.codes.shape[1], bias)
        else:
            if qt is not None:
                dense.setdefault((grid_name(qt.grid), blocks), []).append(name)
            made[name] = Dense(mod.weight.detach().to(torch.bfloat16), bias)
        return made[name]

    fm = build(model, FastConfig(dtype="bf16", weights="gguf", kernel=cfg.kernel), weights)
    for (grid, why), names in dense.items():
        more = f" and {len(names) - 1} more weights" if len(names) > 1 else ""
        log.warning("%s: %s%s on the grid %s have no kernel (%s): they run as their dequantised codes in bf16",
                    path.name, names[0], more, grid, why)
    kinds = sorted({ggmlkernel.TYPES[m.qtype][0] for m in made.values() if isinstance(m, GGUFQ)})
    log.info("%s (%s) on the fast path with its own codes as %s blocks%s", path.name, method or "quantised",
             "/".join(kinds) or "(no)", "" if fm.fused is not None else " (per-op: the fused step does not cover this model)")
    return fm

"""The one-call fused decode step: slmkit's kernel library (kernels/decode.c) runs one new token of each of several
sequences through every layer of a :class:`~slmkit.runtime.generate.FastModel` in a single C call (no per-op dispatch).

:func:`covers` says which architectures the step computes, :func:`attach` builds its per-layer descriptor table
(norm and matrix addresses, ``slmkit_decode_batch``) and the architecture extras (``slmkit_decode_batch_arch``), each
value at the position :mod:`slmkit.runtime.decodelayout` names (decode.c's enums, checked when the library loads),
:func:`fusable` says whether a cache suits it, and :func:`run` makes the call. Split out of
:mod:`slmkit.runtime.generate`, whose :func:`~slmkit.runtime.generate.forward` takes this path for decode steps
when the model has a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from slmkit.errors import ConfigError
from slmkit.runtime import decodelayout as DL
from slmkit.runtime import q4kernel
from slmkit.runtime.arch import ArchSpec
from slmkit.runtime.kvcache import FullCache
from slmkit.runtime.weights import GGUFQ, Q4, Concat, Int8

if TYPE_CHECKING:
    from slmkit.runtime.generate import FastModel

__all__ = ["covers", "attach", "fusable", "run"]


def covers(arch: ArchSpec) -> bool:
    """Whether the one-call fused decode step (kernels/decode.c, ``slmkit_decode_batch_arch``) computes this family.

    It runs SiLU or GELU-tanh, RMSNorm scales (Gemma's ``1 + w`` passed as the effective scale, in bf16), per-head
    q/k norms, the norms on each block's output, sliding windows, per-layer rotary tables, a query scale and an
    attention soft-cap (the final soft-cap and the embedding scale are applied in Python). It does not run partial
    rotary (Phi-3's ``partial_rotary_factor < 1``) or biases other than q/k/v's (Qwen2's q/k/v biases it adds;
    :func:`_segments` has no descriptor for an o/gate/up/down matrix with a bias): those models decode per op,
    where :func:`slmkit.runtime.generate.forward`'s torch path follows every field.
    """
    return arch.rotary_fraction == 1.0


def _segments(m, bias_ok: bool = False) -> list[tuple] | None:
    """The fused step's matrix descriptors of a weight (parts of a Concat side by side); None if it has no kernel there
    (or has a bias, unless ``bias_ok``: the q|k|v bias goes to the step separately, :func:`_qkv_bias`)."""
    if isinstance(m, Concat):
        parts = [_segments(p, bias_ok) for p in m.parts]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    if type(m) in (Q4, GGUFQ) and (m.b is None or bias_ok):
        return m.segments()
    return None


def _qkv_bias(fm: FastModel, m) -> int:
    """Address of the fp32 q|k|v bias of ``m`` (zeros for parts without one; kept in ``fm.fused_keep``), 0 when none."""
    parts = m.parts if isinstance(m, Concat) else [m]
    if all(p.b is None for p in parts):
        return 0
    b = torch.cat([p.b.float() if p.b is not None else torch.zeros(p.q.shape[0]) for p in parts]).contiguous()
    fm.fused_keep.append(b)
    return b.data_ptr()


def _table(fm: FastModel) -> torch.Tensor | None:
    """decode.c's ``layers`` table (:mod:`slmkit.runtime.decodelayout`): per layer the two norm weights, then the
    matrix slots q, k, v (a fused q|k|v fills ``S_Q``), o, gate, up (a fused gate|up fills ``S_GATE``), down.

    ``None`` when a matrix has no kernel in the fused step (dense or int8 weights, biases), the
    library is unavailable, or a size does not suit it (multiples of 64); the forward pass then runs per op.
    """
    D, hd, F = fm.layers[0].attn_norm.shape[0], fm.head_dim, fm.ffn
    if q4kernel.load() is None or D % 64 or (fm.heads * hd) % 64 or F % 64 or hd % 2 or fm.dtype != torch.bfloat16:
        return None
    rows = []
    for ly in fm.layers:
        groups = [(DL.S_Q, 3, _segments(ly.qkv, bias_ok=True)), (DL.S_O, 1, _segments(ly.o)),
                  (DL.S_GATE, 2, _segments(ly.gate_up)), (DL.S_DOWN, 1, _segments(ly.down))]
        if any(segs is None or len(segs) > n or (n == 1 and len(segs) != 1) for _, n, segs in groups):
            return None
        row = [0] * DL.L_N  # empty slots stay KIND_EMPTY with every value 0
        row[DL.L_ANORM], row[DL.L_MNORM] = _bf16(fm, ly.attn_norm), _bf16(fm, ly.mlp_norm)
        for first, _, segs in groups:
            for i, seg in enumerate(segs):
                at = DL.L_SEGS + (first + i) * DL.SEG_N
                row[at:at + DL.SEG_N] = seg
        rows.append(row)
    _fused_extras(fm)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1)


def _bf16(fm: FastModel, w: torch.Tensor | None) -> int:
    """Address of ``w`` in bf16 (a copy kept in ``fm.fused_keep`` when it is not bf16; Gemma's fp32 ``1 + w``); 0 for None."""
    if w is None:
        return 0
    if w.dtype != torch.bfloat16:
        w = w.to(torch.bfloat16).contiguous()
        fm.fused_keep.append(w)
    return w.data_ptr()


def _fused_extras(fm: FastModel) -> None:
    """The fused step's architecture extras (decode.c ``X_*`` per layer, ``F_*`` per model) from ``fm.arch``;
    none (``fm.fused_ext`` None: the plain llama step) when every extra is absent."""
    a = fm.arch
    fm.rope_keys = tuple(dict.fromkeys(ly.rope_key for ly in fm.layers))
    ext = torch.zeros(len(fm.layers), DL.X_N, dtype=torch.int64)
    for i, ly in enumerate(fm.layers):
        x = ext[i]
        x[DL.X_QNORM], x[DL.X_KNORM] = _bf16(fm, ly.q_norm), _bf16(fm, ly.k_norm)
        x[DL.X_PANORM], x[DL.X_PMNORM] = _bf16(fm, ly.post_attn_norm), _bf16(fm, ly.post_mlp_norm)
        x[DL.X_WINDOW], x[DL.X_ROPE] = a.window(i) or 0, fm.rope_keys.index(ly.rope_key)
        x[DL.X_QKVBIAS] = _qkv_bias(fm, ly.qkv)
    fp, plain = torch.zeros(DL.F_N, dtype=torch.float32), torch.zeros(DL.F_N, dtype=torch.float32)
    fp[DL.F_SCALE], fp[DL.F_SOFTCAP] = a.attn_scale or 0.0, a.attn_softcap or 0.0
    fp[DL.F_ACT], fp[DL.F_NROPE] = 1.0 if a.act == "gelu_tanh" else 0.0, float(len(fm.rope_keys))
    plain[DL.F_NROPE] = 1.0  # the llama step: SiLU, 1/sqrt(hd), no soft-cap, one rotary table
    if bool(ext.any()) or not torch.equal(fp, plain):
        fm.fused_ext, fm.fused_fp = ext.reshape(-1), fp


def attach(fm: FastModel, with_head: bool) -> None:
    """Give ``fm`` the fused step's descriptor table (``fm.fused``; left None when a matrix or size does not suit the
    kernel, :func:`_table`) and, with ``with_head`` (GGUF weights), the output head's descriptor so that the step also
    runs the final norm and the head (``fm.fused_head``, ``fm.fused_norm``; the q4 path keeps its head in torch, so its
    logits are unchanged)."""
    fm.fused = _table(fm)
    head_seg = _segments(fm.head) if with_head and fm.fused is not None else None
    if head_seg is not None and len(head_seg) == 1:
        fm.fused_head = torch.tensor(head_seg[0], dtype=torch.int64)
        fm.fused_norm = fm.norm.to(torch.bfloat16).contiguous()  # the step reads bf16 (Gemma's 1 + w is fp32)


def fusable(cache) -> bool:
    """Whether the fused step can run a decode step on ``cache``: a contiguous bf16 full cache."""
    return type(cache) is FullCache and cache.k.dtype == torch.bfloat16 and cache.k.is_contiguous() and cache.v.is_contiguous()


def run(fm: FastModel, segs: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One new token of each of the segments (:class:`~slmkit.runtime.generate.Segment`) through every layer in one
    call of slmkit's kernel library; advances each cache.

    Returns the hidden states (M, D) fp32 after the last layer, and the logits (M, V) before the final soft-cap when
    the step also ran the final norm and the head (``fm.fused_head``; else None: the caller runs them in torch).
    """
    for s in segs:
        if s.cache.seen + 1 > min(fm.max_positions, s.cache.capacity):
            raise ConfigError(f"context of {s.cache.seen + 1} tokens exceeds the KV cache capacity of {s.cache.capacity}")
    ids = torch.cat([s.ids for s in segs])
    table = fm.embed if isinstance(fm.embed, (Int8, GGUFQ)) else fm.head
    x = table.rows(ids, torch.float32) if hasattr(table, "rows") else fm.embed[ids].float()
    x = (x if fm.embed_scale is None else x * fm.embed_scale.float()).contiguous()
    pos = [s.cache.seen for s in segs]
    tables = [fm.rope_at(p, key) for p in pos for key in fm.rope_keys]  # (M x R) tables, R rotary keys per token
    cos = torch.stack([c for c, _ in tables]).contiguous()
    sin = torch.stack([s for _, s in tables]).contiguous()
    kp = torch.tensor([s.cache.k.data_ptr() for s in segs], dtype=torch.int64)
    vp = torch.tensor([s.cache.v.data_ptr() for s in segs], dtype=torch.int64)
    caps = torch.tensor([s.cache.capacity for s in segs], dtype=torch.int32)
    posv = torch.tensor(pos, dtype=torch.int32)
    head = fm.fused_head
    logits = torch.empty(len(segs), int(head[DL.SEG_ROWS])) if head is not None else None  # (M, V), written by the call
    lib = q4kernel.require()
    args = (
        x.data_ptr(), len(segs), len(fm.layers), x.shape[1], fm.heads, fm.kv_heads, fm.head_dim, fm.ffn, fm.eps,
        fm.fused.data_ptr(), kp.data_ptr(), vp.data_ptr(), caps.data_ptr(), posv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        None if head is None else fm.fused_norm.data_ptr(), None if head is None else head.data_ptr(),
        None if head is None else logits.data_ptr(),
    )
    if fm.fused_ext is None:  # llama: the step without architecture extras
        rc = lib.slmkit_decode_batch(*args)
    else:
        rc = lib.slmkit_decode_batch_arch(*args, fm.fused_ext.data_ptr(), fm.fused_fp.data_ptr())
    if rc:
        raise RuntimeError(f"fused decode step failed (code {rc})")
    for s in segs:
        s.cache.advance(1)
    return x, logits

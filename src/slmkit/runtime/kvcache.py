"""KV-cache policies for the fast decoding path, behind one interface and one registry.

A policy is a frozen config dataclass (its knobs) that builds a cache object for
one sequence. The cache owns its storage *and* the attention over it, so a
policy can store keys compressed or evict them without the model knowing:

* ``full``: every key/value at the compute dtype, in a pre-allocated static buffer.
* ``int8`` / ``int4``: keys and values quantised per token and per KV head with an
  asymmetric (min/max) scale, as in KIVI-style KV quantisation (Liu et al. 2024,
  arXiv:2402.02750); int4 packs two codes per byte. Attention runs over the
  dequantised cache (including the tokens just written).
* ``streaming``: attention sinks + a sliding window (StreamingLLM, Xiao et al.
  2023, arXiv:2309.17453): the first ``sinks`` tokens and the most recent
  ``budget - sinks`` tokens are kept.
* ``h2o``: heavy-hitter eviction (H2O, Zhang et al. 2023, arXiv:2306.14048): the
  ``recent`` newest tokens plus the tokens with the largest accumulated attention
  (summed over all queries so far, per KV head) are kept, ``budget`` in total.

Memory accounting is exact for the persistent storage: :meth:`nbytes` is the sum
of ``numel * element_size`` of every tensor a cache holds between steps, and
``bytes_for(shape, tokens)`` gives the same number for a cache that holds
``tokens`` tokens (used by :mod:`slmkit.runtime.fit`). Transient buffers built
during one attention call are not counted (they are freed before the next).

Keys are stored after RoPE, at their original positions (StreamingLLM's
re-indexing of positions inside the cache is not done; it matters only beyond
the model's trained context).

Chunked prefill: a chunk of ``T`` new tokens attends to what the cache holds
before the chunk plus the chunk itself (causally). Token-by-token decoding
(``T = 1``) is exact for every policy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError
from slmkit.registry import Registry

#: name -> zero-argument-or-keyword factory of a policy config (e.g. ``KV_POLICIES.get("int8")(budget=None)``)
KV_POLICIES: Registry = Registry("kv policy")


@dataclass(frozen=True)
class KVShape:
    """What a cache stores per token: ``layers`` x 2 (K, V) x ``kv_heads`` x ``head_dim``."""

    layers: int
    kv_heads: int
    heads: int  #: query heads (a multiple of kv_heads: GQA)
    head_dim: int
    dtype: torch.dtype = torch.float32  #: compute dtype of keys/values

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------------- attention helpers


def _causal_mask(t_new: int, n_old: int, device) -> torch.Tensor:
    """(T, n_old + T) bool: every new token sees all old entries and the new ones up to itself."""
    old = torch.ones(t_new, n_old, dtype=torch.bool, device=device)
    new = torch.ones(t_new, t_new, dtype=torch.bool, device=device).tril()
    return torch.cat([old, new], dim=1)


@dataclass(frozen=True)
class AttnOpts:
    """A layer's attention beyond plain causal softmax(q k^T / sqrt(D)) v (:class:`slmkit.runtime.arch.ArchSpec`)."""

    scale: float | None = None  #: query scaling (None: D ** -0.5); Gemma: query_pre_attn_scalar ** -0.5
    softcap: float | None = None  #: scores -> c * tanh(scores / c) before the mask (Gemma 2)
    window: int | None = None  #: a query at position p sees keys at positions > p - window (itself included)


def attend_opts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_old: int, opts: AttnOpts) -> torch.Tensor:
    """:func:`sdpa` with a scale, soft-cap and/or sliding window, as transformers' ``eager_attention_forward``
    computes them (scores * scale, soft-cap, mask, fp32 softmax, weights @ v); keys at positions 0..n_old+T-1.

    Only the keys some query's window reaches are read: decoding with a window costs O(window), not O(context).
    """
    t, d = q.shape[2], q.shape[-1]
    first = 0 if opts.window is None else max(0, n_old - opts.window + 1)  # oldest key the first new query sees
    k, v = k[:, :, first:], v[:, :, first:]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: repeat KV heads as transformers' repeat_kv does
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scale = d**-0.5 if opts.scale is None else opts.scale
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # (1, H, T, S)
    if opts.softcap is not None:
        w = torch.tanh(w / opts.softcap) * opts.softcap
    qpos = torch.arange(n_old, n_old + t)[:, None]  # (T, 1)
    kpos = torch.arange(first, n_old + t)[None, :]  # (1, S)
    allowed = kpos <= qpos
    if opts.window is not None:
        allowed &= kpos > qpos - opts.window
    if not bool(allowed.all()):
        w = w.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_old: int, opts: AttnOpts | None = None) -> torch.Tensor:
    """Attention of q (1, H, T, D) over k, v (1, Hk, n_old + T, D); the last T keys are the new tokens.

    ``opts`` (a layer's scale, soft-cap, sliding window) runs :func:`attend_opts` instead.
    """
    if opts is not None:
        return attend_opts(q, k, v, n_old, opts)
    t = q.shape[2]
    hk = k.shape[1]
    groups = q.shape[1] // hk
    if t == 1 and groups > 1:
        # GQA decode step: query head h reads KV head h // groups (transformers' repeat_kv order), so the
        # `groups` query heads of one KV head can stand in the query-length axis: no copy of the cache.
        o = F.scaled_dot_product_attention(q.reshape(1, hk, groups, q.shape[-1]), k, v)
        return o.reshape(1, hk * groups, 1, q.shape[-1])
    if groups > 1 and n_old > 0:
        # GQA over a cache (speculative verification, prompt chunks after the first): the same trick for T new
        # tokens, rows g*T + i of the stacked queries; the causal mask repeats per group. Repeating the KV heads
        # instead copied the whole cache per layer (the largest cost of a 5-token pass here).
        mask = _causal_mask(t, n_old, q.device).repeat(groups, 1)  # (groups*T, S)
        o = F.scaled_dot_product_attention(q.reshape(1, hk, groups * t, q.shape[-1]), k, v, attn_mask=mask)
        return o.reshape(1, hk * groups, t, q.shape[-1])
    if groups > 1:  # GQA: repeat KV heads as transformers' repeat_kv does
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if n_old == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(t, n_old, q.device))


# ---------------------------------------------------------------------------- full


@dataclass(frozen=True)
class FullKV:
    """Every key and value at the compute dtype (the baseline)."""

    budget: int | None = None  #: ignored (holds the whole context); accepted for a uniform interface

    def bytes_for(self, shape: KVShape, tokens: int) -> int:
        return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * shape.elem_bytes

    def capacity(self, context: int) -> int:
        return context

    def make(self, shape: KVShape, context: int) -> FullCache:
        return FullCache(shape, context)


class _Cache:
    """State shared by all caches: ``seen`` counts the tokens consumed (= the next position)."""

    def __init__(self, shape: KVShape, capacity: int):
        if capacity < 1:
            raise ConfigError(f"KV cache capacity must be >= 1 token, got {capacity}")
        self.shape = shape
        self.capacity = capacity
        self.seen = 0
        self._store: list[torch.Tensor] = []  # every tensor held between steps (for nbytes)

    def advance(self, n: int) -> None:
        """Called once per forward after every layer has attended ``n`` new tokens."""
        self.seen += n

    def nbytes(self) -> int:
        """Bytes of the storage this cache holds between steps (exact)."""
        return sum(t.numel() * t.element_size() for t in self._store)


class FullCache(_Cache):
    def __init__(self, shape: KVShape, capacity: int):
        super().__init__(shape, capacity)
        size = (shape.layers, 1, shape.kv_heads, capacity, shape.head_dim)  # (L, 1, Hk, S, D)
        self.k = torch.zeros(size, dtype=shape.dtype)
        self.v = torch.zeros(size, dtype=shape.dtype)
        self._store = [self.k, self.v]
        self._kl, self._vl = self.k.unbind(0), self.v.unbind(0)  # per-layer views (1, Hk, S, D), made once

    def tokens(self) -> int:
        return self.seen

    def rewind(self, n: int) -> None:
        """Forget every token after the first ``n`` (speculative decoding's rejected drafts); their slots are overwritten next."""
        self.seen = min(self.seen, n)

    def attend(self, layer: int, q, k, v, opts: AttnOpts | None = None):
        """q (1, H, T, D); k, v (1, Hk, T, D) for the T new tokens; returns (1, H, T, D) (``opts``: see :func:`sdpa`)."""
        t, s = q.shape[2], self.seen
        if s + t > self.capacity:
            raise ConfigError(f"context of {s + t} tokens exceeds the KV cache capacity of {self.capacity}")
        kl, vl = self._kl[layer], self._vl[layer]
        kl.narrow(2, s, t).copy_(k)
        vl.narrow(2, s, t).copy_(v)
        return sdpa(q, kl.narrow(2, 0, s + t), vl.narrow(2, 0, s + t), s, opts)


KV_POLICIES.add("full", FullKV)


# ---------------------------------------------------------------------------- quantised


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-vector quantisation over the last dim: x ~ codes * scale + lo.

    Returns uint8 codes (int4: two per byte, low nibble first), and fp16 scale and lo of shape (..., 1).
    """
    levels = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    scale16, lo16 = scale.half(), lo.half()
    # quantise against the fp16-rounded scale/offset actually stored, so dequantisation is consistent
    codes = ((xf - lo16.float()) / scale16.float()).round().clamp(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale16, lo16


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)
    return (codes.float() * scale.float() + lo.float()).to(dtype)


@dataclass(frozen=True)
class QuantKV:
    """Keys/values quantised to ``bits`` per element with an fp16 scale and offset per token and KV head."""

    bits: int = 8  #: 8 or 4
    budget: int | None = None  #: ignored (holds the whole context)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"KV quantisation bits must be 4 or 8, got {self.bits}")

    def bytes_for(self, shape: KVShape, tokens: int) -> int:
        per_vec = shape.head_dim * self.bits // 8 + 2 + 2  # codes + fp16 scale + fp16 offset
        return 2 * shape.layers * shape.kv_heads * tokens * per_vec

    def capacity(self, context: int) -> int:
        return context

    def make(self, shape: KVShape, context: int) -> QuantCache:
        if self.bits == 4 and shape.head_dim % 2:
            raise ConfigError(f"int4 KV needs an even head_dim, got {shape.head_dim}")
        return QuantCache(shape, context, self.bits)


class QuantCache(_Cache):
    def __init__(self, shape: KVShape, capacity: int, bits: int):
        super().__init__(shape, capacity)
        self.bits = bits
        L, Hk, D = shape.layers, shape.kv_heads, shape.head_dim
        self.codes = torch.zeros((2, L, 1, Hk, capacity, D * bits // 8), dtype=torch.uint8)  # (K|V, L, 1, Hk, S, D')
        self.scale = torch.zeros((2, L, 1, Hk, capacity, 1), dtype=torch.float16)
        self.lo = torch.zeros((2, L, 1, Hk, capacity, 1), dtype=torch.float16)
        self._store = [self.codes, self.scale, self.lo]

    def tokens(self) -> int:
        return self.seen

    def attend(self, layer: int, q, k, v, opts: AttnOpts | None = None):
        t, s = q.shape[2], self.seen
        if s + t > self.capacity:
            raise ConfigError(f"context of {s + t} tokens exceeds the KV cache capacity of {self.capacity}")
        for i, x in enumerate((k, v)):
            c, sc, lo = quantize_kv(x, self.bits)
            self.codes[i, layer, :, :, s : s + t] = c
            self.scale[i, layer, :, :, s : s + t] = sc
            self.lo[i, layer, :, :, s : s + t] = lo
        kk, vv = (
            dequantize_kv(self.codes[i, layer, :, :, : s + t], self.scale[i, layer, :, :, : s + t],
                          self.lo[i, layer, :, :, : s + t], self.bits, q.dtype)
            for i in (0, 1)
        )
        return sdpa(q, kk, vv, s, opts)


KV_POLICIES.add("int8", functools.partial(QuantKV, bits=8))
KV_POLICIES.add("int4", functools.partial(QuantKV, bits=4))


# ---------------------------------------------------------------------------- bounded (evicting) caches


class _BoundedCache(_Cache):
    """Holds at most ``capacity`` tokens; ``n`` are valid. Subclasses choose what to keep."""

    def __init__(self, shape: KVShape, capacity: int):
        super().__init__(shape, capacity)
        size = (shape.layers, 1, shape.kv_heads, capacity, shape.head_dim)
        self.k = torch.zeros(size, dtype=shape.dtype)
        self.v = torch.zeros(size, dtype=shape.dtype)
        self._store = [self.k, self.v]
        self.n = 0  # valid entries (same for every layer once a forward completes)
        self._n_next = 0

    def tokens(self) -> int:
        return self.n

    def advance(self, n: int) -> None:
        super().advance(n)
        self.n = self._n_next


@dataclass(frozen=True)
class StreamingKV:
    """Attention sinks + sliding window (StreamingLLM): keep the first ``sinks`` and the last ``budget - sinks`` tokens."""

    budget: int | None = 1024  #: tokens kept in total (sinks + window)
    sinks: int = 4  #: initial tokens always kept (the "attention sinks", Xiao et al. 2023, Sec. 3.2)

    def __post_init__(self):
        if self.budget is None or self.budget < 2:
            raise ConfigError(f"streaming KV needs budget >= 2 tokens, got {self.budget}")
        if not 0 <= self.sinks < self.budget:
            raise ConfigError(f"streaming KV needs 0 <= sinks < budget, got sinks={self.sinks}, budget={self.budget}")

    def bytes_for(self, shape: KVShape, tokens: int) -> int:
        return FullKV().bytes_for(shape, min(tokens, self.budget))

    def capacity(self, context: int) -> int:
        return min(context, self.budget)

    def make(self, shape: KVShape, context: int) -> StreamingCache:
        return StreamingCache(shape, self.capacity(context), self.sinks)


class StreamingCache(_BoundedCache):
    """Slots [0, sinks) hold the sink tokens; the rest is a ring buffer over the window."""

    def __init__(self, shape: KVShape, capacity: int, sinks: int):
        super().__init__(shape, capacity)
        self.sinks = min(sinks, capacity - 1) if capacity > 1 else 0
        self.window = capacity - self.sinks

    def attend(self, layer: int, q, k, v):
        t, n = q.shape[2], self.n
        kk = torch.cat([self.k[layer, :, :, :n], k], dim=2)  # (1, Hk, n + T, D)
        vv = torch.cat([self.v[layer, :, :, :n], v], dim=2)
        out = sdpa(q, kk, vv, n)
        # keep the sinks and the newest `window` tokens: write the last min(T, window) new ones (and any sinks)
        start = self.seen
        pos = torch.arange(start, start + t)
        write = (pos < self.sinks) | (pos >= start + t - self.window)
        pos = pos[write]
        slots = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % max(self.window, 1))
        js = pos - start
        self.k[layer].index_copy_(2, slots, k[:, :, js])  # (1, Hk, S, D) <- (1, Hk, W, D)
        self.v[layer].index_copy_(2, slots, v[:, :, js])
        self._n_next = min(self.capacity, start + t)
        return out


KV_POLICIES.add("streaming", StreamingKV)


@dataclass(frozen=True)
class H2OKV:
    """Heavy-hitter oracle: keep ``recent`` newest tokens plus the highest accumulated-attention ones, ``budget`` in all."""

    budget: int | None = 1024  #: tokens kept in total
    recent_ratio: float = 0.5  #: share of the budget reserved for the most recent tokens (H2O uses 1/2, Sec. 5)

    def __post_init__(self):
        if self.budget is None or self.budget < 2:
            raise ConfigError(f"h2o KV needs budget >= 2 tokens, got {self.budget}")
        if not 0 < self.recent_ratio < 1:
            raise ConfigError(f"h2o recent_ratio must be in (0, 1), got {self.recent_ratio}")

    @property
    def recent(self) -> int:
        return max(1, min(self.budget - 1, round(self.budget * self.recent_ratio)))

    def bytes_for(self, shape: KVShape, tokens: int) -> int:
        kept = min(tokens, self.budget)
        # K and V, plus one fp32 accumulated score per kept token and KV head
        return FullKV().bytes_for(shape, kept) + shape.layers * shape.kv_heads * kept * 4

    def capacity(self, context: int) -> int:
        return min(context, self.budget)

    def make(self, shape: KVShape, context: int) -> H2OCache:
        cap = self.capacity(context)
        return H2OCache(shape, cap, min(self.recent, cap))


class H2OCache(_BoundedCache):
    def __init__(self, shape: KVShape, capacity: int, recent: int):
        super().__init__(shape, capacity)
        self.recent = recent
        self.score = torch.zeros((shape.layers, shape.kv_heads, capacity), dtype=torch.float32)  # (L, Hk, S)
        self._store = [self.k, self.v, self.score]

    def attend(self, layer: int, q, k, v):
        t, n = q.shape[2], self.n
        hk, d = self.shape.kv_heads, self.shape.head_dim
        g = q.shape[1] // hk
        kk = torch.cat([self.k[layer, 0, :, :n], k[0]], dim=1)  # (Hk, n + T, D)
        vv = torch.cat([self.v[layer, 0, :, :n], v[0]], dim=1)
        qg = q[0].reshape(hk, g * t, d)  # (Hk, G*T, D): query heads grouped by their KV head
        logits = (qg.float() @ kk.float().transpose(1, 2)) / math.sqrt(d)  # (Hk, G*T, n+T)
        mask = _causal_mask(t, n, q.device).repeat(g, 1)  # (G*T, n+T)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        out = (probs @ vv.float()).to(q.dtype).reshape(1, hk * g, t, d)  # (1, H, T, D)
        # accumulated attention each key received from every query so far (H2O, Sec. 4, Eq. 2's score)
        acc = torch.cat([self.score[layer, :, :n], torch.zeros(hk, t)], dim=1) + probs.sum(1)  # (Hk, n+T)
        total = n + t
        if total <= self.capacity:
            keep = None
            self.k[layer, 0, :, n:total] = k[0]
            self.v[layer, 0, :, n:total] = v[0]
            self.score[layer, :, :total] = acc
        else:
            recent = self.recent
            heavy = self.capacity - recent
            old = acc[:, : total - recent]  # candidates for heavy hitters (everything but the recent window)
            top = old.topk(heavy, dim=1).indices.sort(dim=1).values  # (Hk, heavy)
            rec = torch.arange(total - recent, total).expand(hk, recent)
            keep = torch.cat([top, rec], dim=1)  # (Hk, capacity)
            idx = keep[:, :, None].expand(hk, self.capacity, d)
            self.k[layer, 0] = kk.gather(1, idx)
            self.v[layer, 0] = vv.gather(1, idx)
            self.score[layer] = acc.gather(1, keep)
        self._n_next = min(total, self.capacity)
        return out


KV_POLICIES.add("h2o", H2OKV)


def kv_policy(name: str, budget: int | None = None, **knobs):
    """The config of policy ``name`` (``budget`` in tokens for the evicting ones)."""
    factory = KV_POLICIES.get(name)
    try:
        return factory(budget=budget, **knobs) if budget is not None else factory(**knobs)
    except TypeError as err:
        raise ConfigError(f"bad option for kv policy {name!r}: {err}") from None


__all__ = ["KV_POLICIES", "AttnOpts", "KVShape", "kv_policy", "quantize_kv", "dequantize_kv", "sdpa"]

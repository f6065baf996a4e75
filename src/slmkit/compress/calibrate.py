"""Calibration: token ids to calibrate on, and the layer-by-layer statistics loop.

The loop is the sequential scheme of GPTQ (Frantar et al. 2022, arXiv:2210.17323,
Sec. 4 "Full algorithm") and SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774):
the inputs of decoder block 0 are captured once; then, block after block, the
block is run with forward hooks on its ``nn.Linear`` layers to accumulate input
statistics, a compression function edits the block in place, and the *compressed*
block is run again to produce the inputs of the next block. So each block is
calibrated on the activations the compressed model really feeds it, and memory
holds one block's activations at a time.

Calibration text is a user file (plain text or jsonl with ``text`` fields), or,
when none is given, text sampled from the model itself (self-calibration, as in
LLM-QAT, Liu et al. 2023, arXiv:2305.17888), so the default model needs no data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmkit import progress
from slmkit.data.readers import json_line, read_utf8
from slmkit.errors import ConfigError, DataError, UnsupportedModelError

log = logging.getLogger(__name__)

#: rows of inputs kept per Linear in :attr:`LinearStats.sample` (AWQ's scale search)
SAMPLE_ROWS = 512


@dataclass(frozen=True)
class CalibConfig:
    """How much calibration text to use and where it comes from."""

    n_samples: int = 64  #: sequences
    seq_len: int = 256  #: tokens per sequence
    seed: int = 0  #: picks the windows of a file / seeds self-generation
    source: str | None = None  #: text or jsonl file; None = text sampled from the model itself

    def __post_init__(self):
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"calibration n_samples must be an integer >= 1, got {self.n_samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"calibration seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.source is not None and not Path(self.source).is_file():
            raise DataError(f"calibration file {self.source} does not exist", "pass a text or jsonl file with --calib")

    @property
    def tokens(self) -> int:
        return self.n_samples * self.seq_len


def read_calibration_text(path: str | Path) -> str:
    """The text of a calibration file: plain text, or jsonl whose rows have a ``text`` field."""
    p = Path(path)
    raw = read_utf8(p, "calibration file", "pass a file with some text")
    if p.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            row = json_line(line, f"{p}:{lineno}")  # too deep nesting and 5,000-digit numbers are DataErrors too
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{p}:{lineno}: expected an object with a string 'text' field")
            texts.append(row["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise DataError(f"calibration file {p} is empty", "pass a file with some text")
    return raw


def _ids_from_text(text: str, tokenizer, cfg: CalibConfig, source: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # (L,)
    chunks = ids.numel() // cfg.seq_len
    if chunks < cfg.n_samples:
        raise DataError(
            f"calibration text {source} has {ids.numel():,} tokens; {cfg.n_samples} samples x {cfg.seq_len} tokens "
            f"needs {cfg.tokens:,}",
            "pass a longer file, or fewer/shorter samples",
        )
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(chunks, generator=g)[: cfg.n_samples].sort().values
    windows = ids[: chunks * cfg.seq_len].view(chunks, cfg.seq_len)  # (chunks, T)
    return windows[pick].clone()


@torch.no_grad()
def self_generate(model, tokenizer, n: int, length: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """``(n, length)`` token ids sampled from ``model`` (temperature 1, full vocabulary).

    Each sequence starts from the BOS token (or EOS when there is none); the
    first token after it is drawn uniformly from the vocabulary so that the
    sequences differ from the first step (LLM-QAT's self-generation, Sec. 2.1).
    Special tokens are never sampled, so every sequence has exactly ``length`` tokens.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UnsupportedModelError("self-calibration needs a tokenizer with a BOS or EOS token", "pass --calib FILE")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    banned = torch.tensor(sorted({int(t) for t in tokenizer.all_special_ids if 0 <= t < vocab}), dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    allowed_ids = allowed.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    out = []
    progress.step("self-generated calibration tokens", 0, n * length)
    for b0 in range(0, n, batch_size):
        b = min(batch_size, n - b0)
        first = allowed_ids[torch.randint(allowed_ids.numel(), (b,), generator=g)]
        seq = torch.cat([torch.full((b, 1), start, dtype=torch.long), first[:, None]], dim=1)  # (B, 2)
        res = model(seq.to(device), use_cache=True)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        for t in range(length - 1):
            progress.step("self-generated calibration tokens", b0 * length + b * (t + 1), n * length)
            logits = res.logits[:, -1].float().cpu()  # (B, V)
            logits[:, ~allowed] = -math.inf
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)  # (B, 1)
            seq = torch.cat([seq, nxt], dim=1)
            res = model(nxt.to(device), cache=cache, use_cache=True)
            cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        out.append(seq[:, 1:])  # drop the start token: (B, length)
        progress.step("self-generated calibration tokens", (b0 + b) * length, n * length)
    return torch.cat(out)


def calibration_ids(model, tokenizer, cfg: CalibConfig = CalibConfig()) -> torch.Tensor:
    """``(cfg.n_samples, cfg.seq_len)`` LongTensor of calibration token ids.

    From ``cfg.source``: the text is tokenised once, cut into consecutive
    ``seq_len`` windows, and ``n_samples`` of them are picked at random (seeded).
    Too little text raises :class:`DataError`. Without a source: self-calibration.
    """
    if cfg.source is not None:
        text = read_calibration_text(cfg.source)
        return _ids_from_text(text, tokenizer, cfg, cfg.source)
    log.info("self-calibration: sampling %d x %d tokens from the model", cfg.n_samples, cfg.seq_len)
    return self_generate(model, tokenizer, cfg.n_samples, cfg.seq_len, seed=cfg.seed)


# --------------------------------------------------------------------------------------
# statistics


@dataclass
class LinearStats:
    """Input statistics of one ``nn.Linear`` over the calibration tokens.

    Linears that read the same tensor (q/k/v, gate/up) share one object: read it, do not edit it.
    """

    H: torch.Tensor  #: (in, in) fp32, sum_x x x^T / n  (GPTQ's Hessian 2 X X^T, up to a factor); (0, 0) if not asked
    sq_norm: torch.Tensor  #: (in,) fp32, sum_x x_j^2 (Wanda's ||X_j||_2^2)
    abs_mean: torch.Tensor  #: (in,) fp32, mean_x |x_j| (AWQ's activation scale)
    n: int  #: tokens seen
    sample: torch.Tensor  #: (<=SAMPLE_ROWS, in) fp32 random subset of the input rows


class _Accumulator:
    def __init__(self, dim: int, total_rows: int, sample_rows: int, gen: torch.Generator, hessian: bool = True):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64) if hessian else None
        self.sq = torch.zeros(dim, dtype=torch.float64)
        self.abs = torch.zeros(dim, dtype=torch.float64)
        self.n = 0
        self.total_rows = max(total_rows, 1)
        self.sample_rows = sample_rows
        self.samples: list[torch.Tensor] = []
        self.gen = gen

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # (n, in)
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()
        self.sq += x.square().sum(0).double()
        self.abs += x.abs().sum(0).double()
        self.n += x.shape[0]
        k = min(x.shape[0], math.ceil(self.sample_rows * x.shape[0] / self.total_rows))
        if k:
            self.samples.append(x[torch.randperm(x.shape[0], generator=self.gen)[:k]].clone())

    def finish(self) -> LinearStats:
        n = max(self.n, 1)
        dim = self.sq.shape[0]
        sample = torch.cat(self.samples)[: self.sample_rows] if self.samples else torch.zeros(0, dim)
        return LinearStats(
            H=(self.xtx / n).float() if self.xtx is not None else torch.empty(0, 0),
            sq_norm=self.sq.float(),
            abs_mean=(self.abs / n).float(),
            n=self.n,
            sample=sample,
        )


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a llama-like HF causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = type(model).__name__
        raise UnsupportedModelError(
            f"{arch} is not a llama-like decoder (no model.model.layers); this compression method needs one",
            "use a llama/mistral/qwen2-style model",
        )
    return layers


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in ``block`` by its qualified name (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering decoder block 0, per batch, and the keyword arguments it got.

    Returns ``(xs, kws)``: ``xs[b]`` is ``(B, T, D)``; ``kws[b]`` holds the attention
    mask, position ids and rotary position embeddings of that batch.
    """
    layers = decoder_layers(model)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration ids must be a non-empty (N, T) tensor, got shape {tuple(ids.shape)}")
    device = next(model.parameters()).device
    xs: list[torch.Tensor] = []
    kws: list[dict] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
        xs.append(hidden.detach())
        kws.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b0 in range(0, ids.shape[0], batch_size):
            batch = ids[b0 : b0 + batch_size].to(device)
            try:
                model.model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return xs, kws


def _run_block(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(x, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


StatsFn = Callable[[int, nn.Module, dict[str, LinearStats]], None]


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    xs: list[torch.Tensor],
    kws: list[dict],
    seed: int = 0,
    sample_rows: int = SAMPLE_ROWS,
    hessian: bool = True,
    only: Collection[str] | None = None,
) -> dict[str, LinearStats]:
    """Run ``block`` on every batch with hooks on its Linears; return their input statistics.

    ``hessian=False`` skips ``H`` (left empty), the costly part; ``only`` limits the Linears hooked.
    """
    lins = {k: v for k, v in linears(block).items() if only is None or k in only}
    total = sum(x.shape[0] * x.shape[1] for x in xs)
    gen = torch.Generator().manual_seed(seed)
    accs: dict[int, _Accumulator] = {}  # one accumulator per distinct input tensor
    owner: dict[str, int] = {}
    # This batch's input tensors (held, so that their memory cannot be reused by a later
    # Linear's input, which would make two different tensors look the same) -> accumulator key.
    seen: list[tuple[torch.Tensor, int]] = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            shared = next((acc for t, acc in seen if t is x), None)  # q/k/v (gate/up) get the same tensor object
            if shared is not None:
                owner.setdefault(name, shared)
                return
            acc_id = owner.get(name)
            if acc_id is None:
                acc_id = len(accs)
                accs[acc_id] = _Accumulator(x.shape[-1], total, sample_rows, gen, hessian)
                owner[name] = acc_id
            seen.append((x, acc_id))
            accs[acc_id].add(x)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in lins.items()]
    try:
        for x, kw in zip(xs, kws):
            seen.clear()
            _run_block(block, x, kw)
    finally:
        for h in handles:
            h.remove()
    done = {k: a.finish() for k, a in accs.items()}
    return {name: done[owner[name]] for name in lins if name in owner}


@torch.no_grad()
def sequential(
    model,
    ids: torch.Tensor,
    fn: StatsFn,
    batch_size: int = 8,
    collect: bool = True,
    seed: int = 0,
    on_block: Callable[[int, list[torch.Tensor], list[torch.Tensor]], None] | None = None,
    hessian: bool = True,
    only: Collection[str] | None = None,
) -> list[torch.Tensor]:
    """Calibrate ``model`` block by block, letting ``fn`` compress each block in place.

    For block ``i``: collect :class:`LinearStats` of its Linears on its inputs
    (when ``collect``; else ``fn`` gets ``{}``), call ``fn(i, block, stats)``, then
    run the (possibly modified) block to produce the inputs of block ``i + 1``.
    ``on_block(i, inputs, outputs)``, if given, sees each block's input and output
    batches (after ``fn``). ``hessian`` and ``only`` are passed to :func:`collect_stats`. Returns the hidden states leaving the last block
    (before the final norm), one ``(B, T, D)`` tensor per batch.
    """
    layers = decoder_layers(model)
    xs, kws = block_inputs(model, ids, batch_size)
    progress.step("blocks", 0, len(layers))
    for i, block in enumerate(layers):
        stats = collect_stats(block, xs, kws, seed=seed + i, hessian=hessian, only=only) if collect else {}
        fn(i, block, stats)
        outs = [_run_block(block, x, kw) for x, kw in zip(xs, kws)]
        if on_block is not None:
            on_block(i, xs, outs)
        xs = outs
        log.debug("calibrated block %d/%d", i + 1, len(layers))
        progress.step("blocks", i + 1, len(layers))
    return xs


def round_sequentially(model, ids: torch.Tensor, names: Collection[str], fn, seed: int = 0,
                       hessian: bool = True, label: str = "") -> dict:
    """Replace each Linear ``names`` (HF weight names) of ``model`` by its codes, block by block.

    ``fn(hf_name, linear, stats) -> QTensor`` chooses the codes from the block's calibration
    statistics (:func:`sequential`); the weight becomes their dequantised value, so later blocks
    calibrate on the already-quantised model. Returns ``{hf_name: QTensor}``.
    """
    wanted = set(names)
    out: dict = {}

    def step(i: int, block, stats) -> None:
        for name, lin in block.named_modules():
            full = f"model.layers.{i}.{name}.weight"
            if full not in wanted:
                continue
            qt = fn(full, lin, stats[name])
            lin.weight.data.copy_(qt.dequantize().to(lin.weight.dtype))
            out[full] = qt
        if label:
            log.info("%s: block %d done", label, i)

    sequential(model, ids, step, seed=seed, hessian=hessian)
    return out


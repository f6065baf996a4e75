"""A continuous-batching generation engine over the fast path (one worker thread).

Requests wait in a bounded queue; the worker admits them into the running batch
(up to ``max_batch`` sequences) *between decoding steps*, so a new request
starts at the next step instead of waiting for the batch to finish (continuous
batching, as in Orca, Yu et al. OSDI 2022). Each step is one call of
:func:`slmkit.runtime.generate.forward` over every active sequence: sequences
still reading their prompt contribute a chunk of up to ``prefill_chunk`` tokens,
the others their last generated token. Every sequence has its own KV cache, so
the KV policy is chosen per request.

Events (text deltas, the end) reach the caller through ``Request.emit``, a
thread-safe callback; the HTTP layer turns them into SSE chunks. A request ends
on EOS, a stop string, ``max_tokens``, cancellation (client gone) or its deadline.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmkit.backends.stream import releasable
from slmkit.errors import ConfigError
from slmkit.runtime.decoding import sample
from slmkit.runtime.generate import FastModel, Segment, forward
from slmkit.runtime.omp import release_pool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  #: sequences decoded together at most
    max_queue: int = 256  #: waiting requests at most (more are refused: HTTP 429)
    prefill_chunk: int = 256  #: prompt tokens a sequence reads per step (bounds the stall of the others)
    max_context: int | None = None  #: prompt + completion tokens per request (default: the model's context)

    def __post_init__(self):
        for k in ("max_batch", "max_queue", "prefill_chunk"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict] = field(default_factory=list)  # per token {token_text: logprob} when top_logprobs > 0
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None  # echo: per prompt token (first is None)
    meta: dict | None = None  # backend-specific extras of a "done" (collaboration modes)
    count: int | None = None  # completion tokens of a "done" when ``tokens`` does not list them


@dataclass
class Request:
    ids: torch.Tensor  # (T,) prompt token ids
    max_new_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    echo_logprobs: bool = False  # compute log-probs of the prompt tokens (echo scoring)
    kv_policy: object = "full"  # a name or a kvcache policy config
    kv_budget: int | None = None
    model: str | None = None  # key into Engine.models (None: the default)
    deadline: float = float("inf")  # time.monotonic() after which the request ends with "timeout"
    mask: object = None  # a slmkit.runtime.constrain.TokenMask (Engine.token_mask): the output follows its grammar
    # worker state
    cancelled: bool = False
    finished: bool = False
    cache: object = None
    gen: torch.Generator | None = None
    read: int = 0  # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    prompt_lps: list = field(default_factory=list)
    pending_lps: list = field(default_factory=list)
    pending_top: list = field(default_factory=list)
    pending_toks: list = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True


SEED_MAX = 2**64 - 1  #: torch.Generator.manual_seed takes 64-bit seeds


def check(req: Request, engine: Engine | None = None) -> None:
    """Raise ``ConfigError`` for a request the worker could not run (so one bad request never reaches a batch)."""
    if engine is not None and (req.model or engine.default) not in engine.models:
        raise ConfigError(f"unknown model {req.model!r}")
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {req.max_new_tokens!r}")
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= SEED_MAX):
        raise ConfigError(f"seed must be an integer in [0, 2**64 - 1], got {req.seed!r}")
    if not (math.isfinite(req.temperature) and (req.temperature == 0 or req.temperature >= 1e-5)):
        raise ConfigError(f"temperature must be 0 (greedy) or a finite number >= 1e-5, got {req.temperature!r}")
    if not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {req.top_p!r}")
    if req.top_logprobs < 0 or req.ids.ndim != 1 or not len(req.ids):
        raise ConfigError("a request needs a non-empty 1-D prompt and top_logprobs >= 0")
    if engine is not None:
        vocab = len(engine.tok)
        if int(req.ids.min()) < 0 or int(req.ids.max()) >= max(vocab, engine.models[req.model or engine.default].vocab):
            raise ConfigError("prompt token ids out of the vocabulary")


class Engine:
    """Owns the models and the worker thread; :meth:`submit` is thread-safe."""

    def __init__(self, models: dict[str, FastModel], tokenizer, cfg: EngineConfig = EngineConfig(), default: str | None = None):
        if not models:
            raise ConfigError("an engine needs at least one model")
        self.models = models
        self.default = default or next(iter(models))
        self.tok = tokenizer
        self.cfg = cfg
        self._q: queue.Queue[Request] = queue.Queue(maxsize=cfg.max_queue)
        self._active: list[Request] = []
        self._stop = threading.Event()
        release_pool()  # this thread's idle OpenMP pool would slow every step of the engine thread (runtime/omp.py)
        self._lltoks: dict[int, object] = {}  # llguidance tokenizers by vocabulary size (constrained requests)
        self._mask_pool = None
        self._mask_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self.stats = {"steps": 0, "tokens_generated": 0, "prompt_tokens": 0, "requests_done": 0,
                      "requests_cancelled": 0, "requests_timed_out": 0, "errors": 0}
        self._thread.start()

    # ------------------------------------------------------------------ API

    def token_mask(self, constraint, model: str | None = None):
        """A checked :class:`~slmkit.runtime.constrain.TokenMask` for one request to ``model`` (thread-safe).

        Raises ``ConstraintError`` for a grammar that does not compile or admits no output. llguidance's
        tokenizer is built once per vocabulary size; one worker thread computes every request's next
        mask while the batch runs its forward pass.
        """
        from concurrent.futures import ThreadPoolExecutor

        from slmkit.runtime.constrain import TokenMask, llg_tokenizer

        fm = self.models[model or self.default]
        with self._mask_lock:
            if fm.vocab not in self._lltoks:
                self._lltoks[fm.vocab] = llg_tokenizer(self.tok, fm.vocab, fm.eos)
            if self._mask_pool is None:
                self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="slmkit-mask")
        mask = TokenMask(self._lltoks[fm.vocab], constraint, self._mask_pool)
        mask.check()
        return mask

    def context_of(self, model: str | None) -> int:
        fm = self.models[model or self.default]
        return min(fm.max_positions, self.cfg.max_context or fm.max_positions)

    def submit(self, req: Request) -> None:
        """Queue ``req``; raises ``ConfigError`` for a request that cannot run, ``queue.Full`` when the queue is full."""
        check(req, self)
        self._q.put_nowait(req)

    @property
    def queued(self) -> int:
        return self._q.qsize()

    @property
    def active(self) -> int:
        return len(self._active)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self._active:
                    continue
                self._step()
            except Exception:  # keep serving: fail the batch, not the server (the text stays in the log)
                log.exception("engine step failed")
                self.stats["errors"] += 1
                for r in self._active:
                    r.emit(Event("error", text="internal error"))
                self._active = []

    def _admit(self) -> None:
        block = not self._active
        while len(self._active) < self.cfg.max_batch:
            try:
                r = self._q.get(timeout=0.05) if block else self._q.get_nowait()
            except queue.Empty:
                return
            block = False
            if r.cancelled:
                self.stats["requests_cancelled"] += 1
                continue
            try:  # one request that cannot start fails alone
                fm = self.models[r.model or self.default]
                ctx = min(self.context_of(r.model), len(r.ids) + r.max_new_tokens)
                r.cache = fm.new_cache(r.kv_policy, context=max(ctx, 1), budget=r.kv_budget)
                r.gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            except ConfigError as err:
                r.emit(Event("error", text=str(err).splitlines()[0], finish_reason="invalid"))
                continue
            except Exception:
                log.exception("admitting a request failed")
                self.stats["errors"] += 1
                r.emit(Event("error", text="internal error"))
                continue
            self._active.append(r)

    def _step(self) -> None:
        now = time.monotonic()
        live = []
        for r in self._active:
            if r.cancelled:
                self.stats["requests_cancelled"] += 1
                r.emit(Event("done", finish_reason="cancelled"))
            elif now > r.deadline:
                self.stats["requests_timed_out"] += 1
                r.emit(Event("error", text="request timed out", finish_reason="timeout"))
            else:
                live.append(r)
        self._active = live
        groups: dict[str, list[Request]] = {}
        for r in live:
            groups.setdefault(r.model or self.default, []).append(r)
        for name, reqs in groups.items():
            segs = []
            for r in reqs:
                if r.read < len(r.ids):
                    chunk = r.ids[r.read : r.read + self.cfg.prefill_chunk]
                    segs.append(Segment(chunk, r.cache, all_logits=r.echo_logprobs))
                else:
                    segs.append(Segment(torch.tensor([r.out[-1]]), r.cache))
            logits = self._forward(self.models[name], segs)
            self.stats["steps"] += 1
            for r, seg, lg in zip(reqs, segs, logits):
                try:  # sampling or detokenising one request fails that request alone
                    self._after(r, seg, lg)
                except ConfigError as err:  # its grammar reached a dead end (slmkit.runtime.constrain)
                    r.finished = True
                    r.cache = None
                    r.emit(Event("error", text=str(err).splitlines()[0], finish_reason="invalid"))
                except Exception:
                    log.exception("finishing a step of one request failed")
                    self.stats["errors"] += 1
                    r.finished = True
                    r.cache = None
                    r.emit(Event("error", text="internal error"))
        self._active = [r for r in self._active if not r.finished]

    def _forward(self, fm, segs: list[Segment]) -> list[torch.Tensor]:
        """``forward`` over one step's segments, batch-invariant: the one-token (decode) segments go
        through one call together, every prompt chunk through a call of its own.

        A sequence's numbers then never depend on what else the server runs: the fused int4 step
        computes each row on its own (bitwise the same alone or in a batch of 16), whereas a prompt
        chunk in the same call would push every row past ``q4kernel.dequant_from_tokens`` onto the bf16
        matmul, and a matmul's rounding depends on its row count. So a seeded request gets the same
        tokens at any concurrency (``gen-data --concurrency``), at the cost of one more call per step
        while prompts are being read.
        """
        out: list[torch.Tensor | None] = [None] * len(segs)
        one = [i for i, s in enumerate(segs) if s.ids.shape[0] == 1]
        if one:
            for i, lg in zip(one, forward(fm, [segs[i] for i in one])):
                out[i] = lg
        for i, s in enumerate(segs):
            if out[i] is None:
                out[i] = forward(fm, [s])[0]
        return out

    def _after(self, r: Request, seg: Segment, lg: torch.Tensor) -> None:
        fm = self.models[r.model or self.default]
        if r.read < len(r.ids):  # this step read (part of) the prompt
            n = len(seg.ids)
            if r.echo_logprobs:
                lp = torch.log_softmax(lg.float(), -1)  # (n, V): row t predicts prompt token read + t + 1
                tgt = r.ids[r.read + 1 : r.read + n + 1]
                r.prompt_lps.extend(lp[torch.arange(len(tgt)), tgt].tolist())
                lg = lg[-1]
            r.read += n
            self.stats["prompt_tokens"] += n
            if r.read < len(r.ids):
                return
            if r.max_new_tokens == 0:
                self._finish(r, "length")
                return
        if r.mask is not None:
            lg = r.mask.apply(lg.float().clone(), r.max_new_tokens - len(r.out))  # logits are inference tensors: no in-place update
        lp = torch.log_softmax(lg.float(), -1)
        tok = sample(lg, r.temperature, r.top_p, r.gen)
        if r.mask is not None:
            tok = r.mask.vet(tok, r.max_new_tokens - len(r.out))
        r.out.append(tok)
        self.stats["tokens_generated"] += 1
        if tok in fm.eos:
            self._flush(r, final=True, drop_last=True)
            self._finish(r, "stop")
            return
        r.pending_toks.append(tok)
        r.pending_lps.append(float(lp[tok]))
        if r.top_logprobs:
            v, i = lp.topk(r.top_logprobs)
            alts: dict[str, float] = {}
            for x, t in zip(v.tolist(), i.tolist()):
                alts.setdefault(self.tok.decode([t]), x)  # ids that decode alike keep the larger log-prob
            r.pending_top.append(alts)
        done = False  # the grammar is complete: end here (nothing but EOS could follow)
        if r.mask is not None and len(r.out) < r.max_new_tokens:
            r.mask.accept(tok)  # the next mask is computed on the engine's mask thread during the next step
            done = r.mask.done
        hit = self._flush(r, final=len(r.out) >= r.max_new_tokens or done)
        if hit or done:
            self._finish(r, "stop")
        elif len(r.out) >= r.max_new_tokens:
            self._finish(r, "length")

    def _flush(self, r: Request, final: bool, drop_last: bool = False) -> bool:
        """Emit new text; hold back what could begin a stop string or an incomplete character. True on a stop hit."""
        ids = r.out[:-1] if drop_last else r.out
        text, end, hit = releasable(self.tok.decode(ids, skip_special_tokens=True), r.sent, r.stop, final)
        if end > r.sent or r.pending_toks:
            r.emit(Event("delta", text=text[r.sent : end], tokens=r.pending_toks, logprobs=r.pending_lps, top=r.pending_top))
            r.sent = end
            r.pending_toks, r.pending_lps, r.pending_top = [], [], []
        return hit

    def _finish(self, r: Request, reason: str) -> None:
        r.finished = True
        self.stats["requests_done"] += 1
        r.emit(Event("done", finish_reason=reason, tokens=list(r.out),
                     prompt_logprobs=[None, *r.prompt_lps] if r.echo_logprobs else None))
        r.cache = None  # free the KV storage now

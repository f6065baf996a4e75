"""Speed and peak memory of a GGUF file on slmkit's fast path, running the file's own blocks.

:func:`fast_speed` builds the fast model from the file's quantised blocks
(:func:`slmkit.runtime.gguffast.build_gguf`; F32/F16 tensors run as dense bf16), then times a
``prompt_tokens`` prefill and ``new_tokens`` greedy decode steps on random token ids (batch 1,
median of ``repeats``, after a warm-up). :func:`fast_speed_isolated` runs it in a fresh Python
process, so the peak resident memory it reports belongs to that file alone: the high-water mark
is reset (``/proc/self/clear_refs``) after the transformers model the fast model was built from
has been freed, so it counts the interpreter, PyTorch, the fast model's weights, the KV cache and
activations, as a process serving the file would hold them.

    python -m slmkit.eval.gguf_speed FILE.gguf [--prompt-tokens 256] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    prompt_tokens: int = 256  #: prefill length (tokens)
    new_tokens: int = 64  #: greedy decode steps after the prompt
    repeats: int = 3  #: timed repetitions; the median is reported
    threads: int | None = None  #: intra-op threads (None: PyTorch's default)
    seed: int = 0  #: seeds the random prompt

    def __post_init__(self):
        if self.prompt_tokens < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise ConfigError(f"prompt_tokens, new_tokens and repeats must be >= 1, got {self.prompt_tokens}, "
                              f"{self.new_tokens}, {self.repeats}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


def reset_peak_memory() -> bool:
    """Reset this process' resident-memory high-water mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes() -> int:
    """This process' peak resident memory (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fast_speed(path: str | Path, cfg: SpeedConfig = SpeedConfig()) -> dict:
    """Decode and prefill tokens/s of ``path`` on the fast path, and the peak memory while running it.

    Raises :class:`~slmkit.errors.ConfigError` / :class:`~slmkit.errors.UnsupportedModelError` when
    the fast path cannot run the file (no kernel library, a block type it does not read).
    """
    import torch

    from slmkit.models import load
    from slmkit.runtime import generate as G
    from slmkit.runtime.gguffast import build_gguf

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, _ = load(str(path))
    fm = build_gguf(path, model=model)
    del model
    gc.collect()
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, fm.vocab, (cfg.prompt_tokens,), generator=g)
    context = min(fm.max_positions, cfg.prompt_tokens + cfg.new_tokens + 1)
    with torch.inference_mode():
        cache = fm.new_cache(context=16)  # warm-up: kernel load, page-in, thread pools
        logits = G.prefill(fm, ids[:8], cache)
        for _ in range(4):
            logits = G.decode_one_token(fm, int(logits.argmax()), cache)
        exact_peak = reset_peak_memory()
        pp, tg = [], []
        for _ in range(cfg.repeats):
            cache = fm.new_cache(context=context)
            t0 = time.perf_counter()
            logits = G.prefill(fm, ids, cache)
            pp.append(cfg.prompt_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(cfg.new_tokens):
                logits = G.decode_one_token(fm, int(logits.argmax()), cache)
            tg.append(cfg.new_tokens / (time.perf_counter() - t0))
    return {
        "decode_tokens_per_s": statistics.median(tg),
        "prefill_tokens_per_s": statistics.median(pp),
        "decode_runs": tg,
        "prefill_runs": pp,
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_exact": exact_peak,  #: False: the mark includes loading (no clear_refs here)
        "weight_bytes": fm.nbytes(),
        "fused_decode": fm.fused is not None,
        "threads": torch.get_num_threads(),
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
    }


def fast_speed_isolated(path: str | Path, cfg: SpeedConfig = SpeedConfig(), timeout: float = 900) -> dict:
    """:func:`fast_speed` in a fresh Python process; ``{"error": ...}`` when the fast path cannot run the file."""
    args = [sys.executable, "-m", "slmkit.eval.gguf_speed", str(path), "--prompt-tokens", str(cfg.prompt_tokens),
            "--new-tokens", str(cfg.new_tokens), "--repeats", str(cfg.repeats), "--seed", str(cfg.seed)]
    env = dict(os.environ)
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {r.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    for f in dataclasses.fields(SpeedConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    args = ap.parse_args(argv)
    from slmkit.errors import SlmkitError

    cfg = SpeedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedConfig)})
    try:
        out = fast_speed(args.path, cfg)
    except SlmkitError as err:
        out = {"error": err.problem}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

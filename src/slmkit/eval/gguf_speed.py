"""Speed and peak memory of a GGUF file on slmkit's fast path, running the file's own blocks.

:func:`fast_speed` builds the fast model from the file's quantised blocks
(:func:`slmkit.runtime.gguffast.build_gguf`), or, for a file without quantised tensors (F32/F16),
the fast path on its weights in fp32 (what ``slmkit generate FILE.gguf --fast`` runs), then times a
``prompt_tokens`` prefill and ``new_tokens`` greedy decode steps on random token ids (batch 1,
after a warm-up). The speeds reported are the best of ``repeats`` runs (as ``timeit`` reports
the fastest: on a shared machine the slower runs measure the other processes); the medians are
kept beside them. :func:`fast_speed_isolated` runs it in a fresh Python
process, so the peak resident memory it reports belongs to that file alone: the high-water mark
is reset (``/proc/self/clear_refs``) after the transformers model the fast model was built from
has been freed, so it counts the interpreter, PyTorch, the fast model's weights, the KV cache and
activations, as a process serving the file would hold them.

    python -m slmkit.eval.gguf_speed FILE.gguf [--prompt-tokens 256] [--new-tokens 64] [--threads 2] [--reference MODEL]
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
    repeats: int = 5  #: timed repetitions; the best is reported (and the median kept)
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


def _same_skeleton(model, path: Path) -> bool:
    """Whether ``path`` holds exactly ``model``'s weights by name, every matrix quantised, and the same norms.

    Then :func:`~slmkit.runtime.gguffast.build_gguf` given ``model`` builds the same fast model as given
    the file loaded: it takes config, norms and rotary from the model and every quantised matrix from
    the file's blocks (a dense matrix would come from the model's values, hence "every matrix quantised").
    """
    import gguf
    import numpy as np

    from slmkit.export.gguf import gguf_name
    from slmkit.runtime.gguffast import DENSE_TYPES

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    want = {gguf_name(k): k for k in state if gguf_name(k) and not (k == "lm_head.weight" and tied)}
    if set(tensors) != set(want):
        return False
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            if not np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(-1), state[want[name]].float().numpy().reshape(-1)):
                return False
        elif int(t.tensor_type) in DENSE_TYPES:
            return False
    return True


def fast_model(path: str | Path, reference: str | None = None):
    """(fast model, weights description) of GGUF file ``path`` on slmkit's fast path.

    A quantised file runs its own blocks (:func:`~slmkit.runtime.gguffast.build_gguf`); a file without
    quantised tensors runs its weights in fp32 (what ``slmkit generate FILE.gguf --fast`` does).
    ``reference`` (a model spec that loads quickly, e.g. the teacher the file was made from) supplies
    config and norms when the file has exactly its skeleton (:func:`_same_skeleton`), which spares
    dequantising the whole file through transformers; the fast model is the same.
    """
    from slmkit.models import load
    from slmkit.runtime import generate as G
    from slmkit.runtime.gguffast import build_gguf, is_quantised

    path = Path(path)
    if not is_quantised(path):
        model, _ = load(str(path))
        return G.build(model, G.FastConfig(dtype="fp32")), "fp32 (the file has no quantised tensors)"
    if reference is not None:
        model, _ = load(reference)
        if _same_skeleton(model, path):
            return build_gguf(path, model=model), "the file's own blocks"
        del model
    model, _ = load(str(path))
    return build_gguf(path, model=model), "the file's own blocks"


def fast_speed(path: str | Path, cfg: SpeedConfig = SpeedConfig(), reference: str | None = None) -> dict:
    """Decode and prefill tokens/s of ``path`` on the fast path, and the peak memory while running it.

    Raises :class:`~slmkit.errors.ConfigError` / :class:`~slmkit.errors.UnsupportedModelError` when
    the fast path cannot run the file (no kernel library, a block type it does not read).
    """
    import torch

    from slmkit.runtime import generate as G

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    fm, weights = fast_model(path, reference)
    gc.collect()
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, fm.vocab, (cfg.prompt_tokens,), generator=g)
    context = min(fm.max_positions, cfg.prompt_tokens + cfg.new_tokens + 1)
    with torch.inference_mode():
        exact_peak = False
        pp, tg = [], []
        for r in range(cfg.repeats + 1):  # the first round is a warm-up: kernel load, page-in, thread pools
            if r == 1:
                pp, tg = [], []
                exact_peak = reset_peak_memory()
            cache = fm.new_cache(context=context)
            t0 = time.perf_counter()
            logits = G.prefill(fm, ids, cache)
            pp.append(cfg.prompt_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(cfg.new_tokens):
                logits = G.decode_one_token(fm, int(logits.argmax()), cache)
            tg.append(cfg.new_tokens / (time.perf_counter() - t0))
    return {
        "decode_tokens_per_s": max(tg),
        "prefill_tokens_per_s": max(pp),
        "decode_median_tokens_per_s": statistics.median(tg),
        "prefill_median_tokens_per_s": statistics.median(pp),
        "weights": weights,
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


def fast_speed_isolated(path: str | Path, cfg: SpeedConfig = SpeedConfig(), reference: str | None = None,
                        timeout: float = 900) -> dict:
    """:func:`fast_speed` in a fresh Python process; ``{"error": ...}`` when the fast path cannot run the file."""
    args = [sys.executable, "-m", "slmkit.eval.gguf_speed", str(path), "--prompt-tokens", str(cfg.prompt_tokens),
            "--new-tokens", str(cfg.new_tokens), "--repeats", str(cfg.repeats), "--seed", str(cfg.seed)]
    if reference is not None:
        args += ["--reference", reference]
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
    ap.add_argument("--reference", default=None, help="a model spec with the file's skeleton (config and norms), loaded instead")
    args = ap.parse_args(argv)
    from slmkit.errors import SlmkitError

    cfg = SpeedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedConfig)})
    try:
        out = fast_speed(args.path, cfg, args.reference)
    except SlmkitError as err:
        out = {"error": err.problem}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and peak memory of GGUF files on slmkit's fast path, running each file's own blocks.

:func:`fast_model` builds a file's fast model from its quantised blocks
(:func:`slmkit.runtime.gguffast.build_gguf`), or, for a file without quantised tensors (F32/F16),
the fast path on its weights in fp32 (what ``slmkit generate FILE.gguf --fast`` runs). A timing
round is a ``prompt_tokens`` prefill then ``new_tokens`` greedy decode steps on random token ids
(batch 1), after one untimed warm-up round.

* :func:`interleaved_speeds` times several files in one process, round-robin (one round of each
  file, then the next round in the opposite order), so that another process slowing the machine
  down hits every file alike; a file's speed is its best round (as ``timeit`` reports the fastest:
  on a shared machine the slower rounds measure the other processes), the median is kept beside it.
* :func:`fast_speed_isolated` runs one file in a fresh Python process, so the peak resident memory
  it reports belongs to that file alone: the high-water mark is reset (``/proc/self/clear_refs``)
  after the transformers model the fast model was built from has been freed, so it counts the
  interpreter, PyTorch, the fast model's weights, the KV cache and activations, as a process
  serving the file would hold them.

    python -m slmkit.eval.gguf_speed FILE.gguf [FILE.gguf ...] [--prompt-tokens 256] [--new-tokens 64]
                                     [--threads 2] [--reference MODEL]   (several files: interleaved)
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

import torch

from slmkit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    prompt_tokens: int = 256  #: prefill length (tokens)
    new_tokens: int = 64  #: greedy decode steps after the prompt
    repeats: int = 10  #: timed rounds per file; the best is reported (and the median kept)
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


def _round(fm, ids: torch.Tensor, cfg: SpeedConfig) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one timing round."""
    from slmkit.runtime import generate as G

    cache = fm.new_cache(context=min(fm.max_positions, cfg.prompt_tokens + cfg.new_tokens + 1))
    t0 = time.perf_counter()
    logits = G.prefill(fm, ids, cache)
    pp = cfg.prompt_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(cfg.new_tokens):
        logits = G.decode_one_token(fm, int(logits.argmax()), cache)
    return pp, cfg.new_tokens / (time.perf_counter() - t0)


def _summary(pp: list[float], tg: list[float]) -> dict:
    return {"decode_tokens_per_s": max(tg), "prefill_tokens_per_s": max(pp),
            "decode_median_tokens_per_s": statistics.median(tg), "prefill_median_tokens_per_s": statistics.median(pp),
            "decode_runs": tg, "prefill_runs": pp}


def _ids(fm, cfg: SpeedConfig) -> torch.Tensor:
    return torch.randint(0, fm.vocab, (cfg.prompt_tokens,), generator=torch.Generator().manual_seed(cfg.seed))


def fast_speed(path: str | Path, cfg: SpeedConfig = SpeedConfig(), reference: str | None = None) -> dict:
    """Decode and prefill tokens/s of ``path`` on the fast path, and the peak memory while running it.

    Raises :class:`~slmkit.errors.ConfigError` / :class:`~slmkit.errors.UnsupportedModelError` when
    the fast path cannot run the file (no kernel library, a block type it does not read).
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    fm, weights = fast_model(path, reference)
    gc.collect()
    ids = _ids(fm, cfg)
    with torch.inference_mode():
        _round(fm, ids, cfg)  # warm-up: kernel load, page-in, thread pools, allocator
        exact_peak = reset_peak_memory()
        runs = [_round(fm, ids, cfg) for _ in range(cfg.repeats)]
    return {
        **_summary([r[0] for r in runs], [r[1] for r in runs]),
        "weights": weights,
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_exact": exact_peak,  #: False: the mark includes loading (no clear_refs here)
        "weight_bytes": fm.nbytes(),
        "fused_decode": fm.fused is not None,
        "threads": torch.get_num_threads(),
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
    }


def interleaved_speeds(paths: list[str | Path], cfg: SpeedConfig = SpeedConfig(), reference: str | None = None) -> dict:
    """``{path: speeds}`` of every file, timed round-robin in this process (see the module docstring);
    a file the fast path cannot run gets ``{"error": ...}``."""
    from slmkit.errors import SlmkitError

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    models, out = {}, {}
    for p in paths:
        try:
            models[str(p)] = fast_model(p, reference)[0]
        except SlmkitError as err:
            out[str(p)] = {"error": err.problem}
    gc.collect()
    ids = {p: _ids(fm, cfg) for p, fm in models.items()}
    runs: dict[str, list[tuple[float, float]]] = {p: [] for p in models}
    order = list(models)
    with torch.inference_mode():
        for p in order:
            _round(models[p], ids[p], cfg)  # warm-up
        for r in range(cfg.repeats):
            for p in (order if r % 2 == 0 else order[::-1]):
                runs[p].append(_round(models[p], ids[p], cfg))
    for p, rs in runs.items():
        out[p] = {**_summary([r[0] for r in rs], [r[1] for r in rs]), "threads": torch.get_num_threads()}
    return out


def _python(args: list[str], cfg: SpeedConfig, timeout: float) -> dict:
    """Run ``python -m slmkit.eval.gguf_speed ARGS`` and return the JSON it prints (or ``{"error": ...}``)."""
    args = [sys.executable, "-m", "slmkit.eval.gguf_speed", *args, "--prompt-tokens", str(cfg.prompt_tokens),
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


def interleaved_speeds_isolated(paths: list[str | Path], cfg: SpeedConfig = SpeedConfig(), reference: str | None = None,
                                timeout: float = 1800) -> dict:
    """:func:`interleaved_speeds` in a fresh Python process (``{"error": ...}`` for the whole set when it fails)."""
    out = _python([*map(str, paths), *(["--reference", reference] if reference else [])], cfg, timeout)
    return out if "error" in out else out["files"]


def fast_speed_isolated(path: str | Path, cfg: SpeedConfig = SpeedConfig(), reference: str | None = None,
                        timeout: float = 900) -> dict:
    """:func:`fast_speed` in a fresh Python process; ``{"error": ...}`` when the fast path cannot run the file."""
    return _python([str(path), *(["--reference", reference] if reference else [])], cfg, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    for f in dataclasses.fields(SpeedConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    ap.add_argument("--reference", default=None, help="a model spec with the files' skeleton (config and norms), loaded instead")
    args = ap.parse_args(argv)
    from slmkit.errors import SlmkitError

    cfg = SpeedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedConfig)})
    try:
        if len(args.paths) == 1:
            out = fast_speed(args.paths[0], cfg, args.reference)
        else:
            out = {"files": interleaved_speeds(args.paths, cfg, args.reference)}
    except SlmkitError as err:
        out = {"error": err.problem}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

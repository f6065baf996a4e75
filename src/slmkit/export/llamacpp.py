"""llama.cpp as reference and runtime: its tools and Python bindings, optional.

slmkit's GGUF files are proven in llama.cpp itself: ``llama-quantize`` makes the
reference files a user would otherwise ship, ``llama-imatrix`` the importance matrix
they are made with, ``llama-perplexity`` scores any file (perplexity, and with
``--kl-divergence`` the KL divergence and top-token agreement against a base
model's logits), ``llama-bench`` times it. ``scripts/build_llamacpp.sh`` builds
them (pinned to the llama.cpp vendored in llama-cpp-python |version|, portable
x86-64 flags) into ``~/.cache/slmkit/llama.cpp-<version>/build/bin``, with the
shared library the bindings load.

Where llama.cpp is absent, :func:`tools` returns ``None`` and :func:`require`
raises a :class:`~slmkit.errors.ConfigError` that says how to build it; tests and
benchmarks that need it skip with that message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from slmkit import settings
from slmkit.errors import ConfigError, SlmkitError

VERSION = "0.3.36"  #: llama-cpp-python release whose vendored llama.cpp we build
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
HOW = "build it with scripts/build_llamacpp.sh (about 10 minutes on 2 cores) or point SLMKIT_LLAMA_CPP at a bin/ directory"


def bin_dir() -> Path:
    """Where the tools and ``libllama.so`` are looked for (``$SLMKIT_LLAMA_CPP`` overrides)."""
    env = settings.llama_cpp_bin()
    if env:
        return env
    home = settings.llama_cpp_home() or Path.home() / ".cache" / "slmkit" / f"llama.cpp-{VERSION}"
    return Path(home) / "build" / "bin"


def tools() -> dict[str, Path] | None:
    """Paths of llama.cpp's tools, or None when any is missing."""
    d = bin_dir()
    found = {t: d / t for t in TOOLS}
    return found if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()) else None


def require(tool: str | None = None) -> Path:
    """The tool's path (or the bin directory); ConfigError saying how to build llama.cpp when absent."""
    found = tools()
    if found is None:
        raise ConfigError(f"llama.cpp's tools are not in {bin_dir()}", HOW)
    return found[tool] if tool else bin_dir()


def _run(args: list[str], timeout: float | None = None) -> str:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode:
        tail = "\n".join(out.strip().splitlines()[-3:])
        raise SlmkitError(f"{Path(args[0]).name} failed (exit {r.returncode}): {tail}")
    return out


def quantize(src: str | Path, dst: str | Path, ftype: str, imatrix: str | Path | None = None,
             threads: int = 2) -> Path:
    """``llama-quantize [--imatrix FILE] SRC DST FTYPE``: llama.cpp's reference file of that type."""
    args = [require("llama-quantize")]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    _run([*args, src, dst, ftype, str(threads)])
    return Path(dst)


def imatrix(model: str | Path, text: str | Path, out: str | Path, ctx: int = 512, chunks: int | None = None,
            threads: int = 2) -> Path:
    """``llama-imatrix``: per-input-column mean squared activations of every matrix, from ``text``."""
    args = [require("llama-imatrix"), "-m", model, "-f", text, "-o", out, "-c", str(ctx), "-t", str(threads),
            "--no-ppl"]
    if chunks:
        args += ["--chunks", str(chunks)]
    _run(args)
    return Path(out)


@dataclass
class PerplexityResult:
    """What ``llama-perplexity`` printed (KL fields only with ``--kl-divergence``)."""

    perplexity: float
    perplexity_err: float | None = None
    kl_divergence: float | None = None
    kl_divergence_err: float | None = None
    top1_agreement: float | None = None  #: fraction of tokens whose top token equals the base model's
    top1_agreement_err: float | None = None
    tokens: int | None = None
    chunks: int | None = None


_NUM = r"([-+0-9.eE]+|nan|inf)"


def parse_perplexity(text: str, kl: bool = False) -> PerplexityResult:
    """Parse ``llama-perplexity``'s output (plain run, or with ``kl`` its ``--kl-divergence`` statistics,
    which must then be there)."""
    def grab(pattern: str) -> tuple[float, float | None] | None:
        m = re.search(pattern, text)
        if not m:
            return None
        return float(m.group(1)), (float(m.group(2)) if m.lastindex and m.lastindex >= 2 and m.group(2) else None)

    ppl = grab(rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*\S+\s*{_NUM}") or grab(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}")
    if ppl is None:
        raise SlmkitError("could not read a perplexity from llama-perplexity's output",
                          "\n".join(text.strip().splitlines()[-3:]))
    kld = grab(rf"Mean\s+KLD:\s*{_NUM}\s*\S+\s*{_NUM}")
    same = grab(rf"Same top p:\s*{_NUM}\s*\S+\s*{_NUM}\s*%")
    if kl and (kld is None or same is None):
        raise SlmkitError("could not read a perplexity's KL divergence statistics from llama-perplexity's output",
                          "\n".join(text.strip().splitlines()[-3:]))
    chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
    n_ctx = re.search(r"n_ctx=(\d+)", text)
    res = PerplexityResult(ppl[0], ppl[1])
    if kld:
        res.kl_divergence, res.kl_divergence_err = kld
    if same:
        res.top1_agreement = same[0] / 100
        res.top1_agreement_err = None if same[1] is None else same[1] / 100
    if chunks:
        res.chunks = int(chunks.group(1))
        if n_ctx:
            res.tokens = res.chunks * (int(n_ctx.group(1)) // 2)  # the second half of each window is scored
    return res


def perplexity(model: str | Path, text: str | Path | None = None, ctx: int = 512, chunks: int | None = None,
               save_base: str | Path | None = None, kl_base: str | Path | None = None,
               threads: int = 2) -> PerplexityResult:
    """Score ``model`` with ``llama-perplexity``.

    ``save_base`` writes the model's log-probabilities (``--kl-divergence-base``) for later
    comparisons; ``kl_base`` compares against such a file (``--kl-divergence``: mean KL divergence
    base || model and top-token agreement over the same tokens, which the file carries).
    """
    args = [require("llama-perplexity"), "-m", model, "-c", str(ctx), "-t", str(threads), "-b", str(ctx)]
    if kl_base is not None:
        args += ["--kl-divergence-base", kl_base, "--kl-divergence"]
    else:
        if text is None:
            raise ConfigError("llama-perplexity needs a text file or a KL base file")
        args += ["-f", text]
        if save_base is not None:
            args += ["--kl-divergence-base", save_base]
    if chunks:
        args += ["--chunks", str(chunks)]
    return parse_perplexity(_run(args), kl=kl_base is not None)


def bench(model: str | Path, tg: int = 128, pp: int = 512, threads: int = 2, repetitions: int = 3,
          binary: str | Path | None = None) -> dict:
    """``llama-bench -o json``: ``{"tg": tokens/s, "pp": tokens/s}`` (averages over repetitions). ``binary``: another
    llama-bench than the build's (e.g. the AVX2-only one of scripts/build_llamacpp_avx2.sh)."""
    if binary is not None and not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        raise ConfigError(f"llama-bench binary {binary} is not an executable file", "build it with make llamacpp-avx2")
    out = _run([binary or require("llama-bench"), "-m", model, "-n", str(tg), "-p", str(pp), "-t", str(threads),
                "-r", str(repetitions), "-o", "json"])
    start = out.find("[")
    rows = json.loads(out[start: out.rfind("]") + 1])
    res = {}
    for r in rows:
        key = "pp" if r.get("n_prompt", 0) and not r.get("n_gen", 0) else "tg"
        res[key] = float(r["avg_ts"])
        res[key + "_std"] = float(r.get("stddev_ts", 0.0))
    return res


def bindings():
    """The ``llama_cpp`` module, loading the shared library of our build (``LLAMA_CPP_LIB_PATH``)."""
    lib = bin_dir()
    if (lib / "libllama.so").is_file():
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib))
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as err:
        raise ConfigError(f"llama-cpp-python is not usable ({type(err).__name__}: {str(err)[:160]})", HOW) from None
    return llama_cpp


def logits(model: str | Path, tokens: list[int], threads: int = 2):
    """llama.cpp's logits (len(tokens), vocab) for one sequence, through the bindings."""
    import numpy as np

    llama_cpp = bindings()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
                          logits_all=True, n_threads=threads, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()

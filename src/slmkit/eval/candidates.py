"""Candidates for deployment, side by side: the teacher, the baselines a user would otherwise ship,
and a build's own GGUF files, all measured in one run on the same held-out text.

:func:`compare` is the entry point (``slmkit build``'s ``candidates`` stage calls it):

1. the teacher is written as an F32 GGUF file: the reference every other file is compared with
   (and itself a candidate, "the teacher");
2. the baselines: the teacher quantised the reference way at each of ``baselines`` (llama.cpp
   file types, e.g. Q8_0, Q4_0, Q4_K_M), with an importance matrix from the calibration text
   when ``imatrix``. Made by a registered :data:`BASELINES` maker: ``llama.cpp``
   (``llama-imatrix`` + ``llama-quantize`` on the F32 file, where the tools are installed) or
   ``slmkit`` (slmkit's ``rtn`` / ``imatrix`` writers, which reproduce llama-quantize's tensor types
   and its rounding without / with an importance matrix);
3. every candidate is scored against the reference on the held-out text
   (:func:`slmkit.eval.heldout.score`: perplexity, mean KL divergence and top-1 agreement with
   standard errors), and, with ``speed``, run on slmkit's fast path in a fresh process
   (:func:`slmkit.eval.gguf_speed.fast_speed_isolated`: decode and prefill tokens/s, peak memory);
4. with ``tasks``, every file is loaded dequantised (:func:`load_like`) and scored on a few
   multiple-choice tasks of the shared data the lm-evaluation-harness way
   (:mod:`slmkit.eval.downstream`): accuracy with its 95% interval, and, on the same items, the
   paired difference from the reference baseline (the teacher's Q4_K_M) with Newcombe's interval
   and McNemar's test, and how often the file picks the teacher's answer.

Which candidate to deploy is :func:`slmkit.eval.recommend.recommend`'s call.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from slmkit.errors import ConfigError, DataError
from slmkit.eval.downstream import TaskConfig
from slmkit.eval.gguf_speed import SpeedConfig, fast_speed_isolated
from slmkit.eval.heldout import ScoreConfig, Quality, score
from slmkit.registry import Registry

log = logging.getLogger(__name__)

#: file types a baseline may be made at (llama.cpp's, that slmkit's writers also reproduce)
BASELINE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_M", "Q3_K_L",
                  "Q3_K_S", "Q2_K")
#: types an importance matrix changes nothing for (8-bit)
NO_IMATRIX = ("Q8_0",)


@dataclass(frozen=True)
class Candidate:
    """A GGUF file to measure."""

    name: str  #: unique, short (it labels charts)
    path: Path  #: the GGUF file
    role: Literal["teacher", "baseline", "artefact"]
    method: str  #: how it was made, in words
    file_type: str | None = None  #: llama.cpp file type (Q4_K_M, ...), F32 for the teacher
    stage: str | None = None  #: the build stage that made it (artefacts)

    @property
    def baseline(self) -> bool:
        return self.role != "artefact"


@dataclass(frozen=True)
class HeldOutText:
    """The evaluation text and the (disjoint) calibration text the baselines' importance matrix uses."""

    eval: Path
    calib: Path | None = None
    source: str = ""  #: where they came from, for the report (no machine paths)


@dataclass(frozen=True)
class BaselineSettings:
    """How the baselines are made and who scores quality: part of :class:`CompareConfig`, and keys of the
    build's candidates stage (which subclasses it rather than copy the fields)."""

    baselines: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_K_M")  #: llama.cpp file types of the teacher to compare with
    imatrix: bool = True  #: baselines with an importance matrix from the calibration text (llama-quantize --imatrix)
    calib_samples: int = 32  #: calibration windows for the importance matrix
    calib_len: int = 512  #: tokens per calibration window (llama-imatrix -c)
    maker: str = "auto"  #: who makes the baselines: auto (llama.cpp where installed) or a name in BASELINES
    scorer: str = "auto"  #: who scores quality: auto (llama.cpp where installed) or a name in heldout.SCORERS

    def __post_init__(self):
        bad = [t for t in self.baselines if t not in BASELINE_TYPES]
        if bad:
            raise ConfigError(f"unknown baseline type {bad[0]!r}", f"use llama.cpp file types: {', '.join(BASELINE_TYPES)}")
        if self.calib_samples < 1 or self.calib_len < 8:
            raise ConfigError(f"calib_samples must be >= 1 and calib_len >= 8, got {self.calib_samples}, {self.calib_len}")
        from slmkit.eval.heldout import SCORERS

        for key, name, registry in (("maker", self.maker, BASELINES), ("scorer", self.scorer, SCORERS)):
            if name != "auto" and name not in registry:
                raise ConfigError(f"{key} must be auto or one of {', '.join(registry.names())}, got {name!r}")

    def baseline_settings(self) -> dict:
        """These fields' values (what a subclass passes on to a :class:`CompareConfig`)."""
        return {f.name: getattr(self, f.name) for f in fields(BaselineSettings)}


@dataclass(frozen=True)
class CompareConfig(BaselineSettings):
    score: ScoreConfig = ScoreConfig()
    speed: SpeedConfig | None = SpeedConfig()  #: None: no speed or memory measurement
    tasks: TaskConfig | None = None  #: downstream multiple-choice tasks (None: none)
    seed: int = 0


@dataclass
class Comparison:
    rows: list[dict]  #: one per candidate: name, path, role, baseline, bytes, bits_per_weight, quality, speed, ...
    scorer: str  #: which scorer measured quality (one for all rows)
    scorer_what: str
    maker: str  #: who made the baselines
    maker_what: str
    text: str  #: the held-out text, in words
    tokens: int | None  #: tokens scored per candidate
    notes: list[str] = field(default_factory=list)
    tasks: dict | None = None  #: the downstream tasks: what each is, the reference, notes (or why they were skipped)


@dataclass(frozen=True)
class BaselineMaker:
    """``make(reference F32 file, teacher, tokenizer, types, text, cfg, work) -> [Candidate]``."""

    make: Callable
    available: Callable[[], bool]
    what: str


BASELINES: Registry[BaselineMaker] = Registry("baseline maker")


def _imatrix_for(t: str, cfg: CompareConfig, text: HeldOutText) -> bool:
    return cfg.imatrix and text.calib is not None and t not in NO_IMATRIX


def _atomic(dest: Path, write: Callable[[Path], None]) -> Path:
    """Write ``dest`` through a temporary name, so an interrupted stage never leaves a half file."""
    if dest.is_file():
        return dest
    tmp = dest.with_name(f".tmp-{dest.name}")
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, dest)
    return dest


def llamacpp_baselines(reference: Path, teacher, tok, types: Sequence[str], text: HeldOutText, cfg: CompareConfig,
                       work: Path) -> list[Candidate]:
    """``llama-quantize`` of the F32 file at each type, ``--imatrix`` from ``llama-imatrix`` on the calibration text."""
    from slmkit.eval.heldout import score_threads
    from slmkit.export import llamacpp

    threads = score_threads(cfg.score)
    imat = None
    if any(_imatrix_for(t, cfg, text) for t in types):
        imat = _atomic(work / f"imatrix-{cfg.calib_samples}.gguf", lambda tmp: llamacpp.imatrix(
            reference, text.calib, tmp, ctx=cfg.calib_len, chunks=cfg.calib_samples, threads=threads))
    out = []
    for t in types:
        im = _imatrix_for(t, cfg, text)
        dest = work / f"llama.cpp-{t}{'-imatrix' if im else ''}.gguf"
        _atomic(dest, lambda tmp, t=t, im=im: llamacpp.quantize(reference, tmp, t, imatrix=imat if im else None, threads=threads))
        method = f"llama-quantize {t}" + (f" --imatrix ({cfg.calib_samples} x {cfg.calib_len} calibration tokens)" if im else "")
        out.append(Candidate(f"llama.cpp {t}{'+imatrix' if im else ''}", dest, "baseline", method, t))
    return out


def slmkit_baselines(reference: Path, teacher, tok, types: Sequence[str], text: HeldOutText, cfg: CompareConfig,
                     work: Path) -> list[Candidate]:
    """slmkit's ``rtn`` (llama-quantize without an importance matrix) / ``imatrix`` (with one) writers at each type."""
    from slmkit.compress.calibrate import CalibConfig, calibration_ids
    from slmkit.compress.qgrid import Grid
    from slmkit.compress.quantize import QUANTIZERS, gguf_grids, quantize
    from slmkit.export.gguf import export_gguf_validated
    from slmkit.export.gguf_mix import base_type

    ids = None
    out = []
    for t in types:
        im = _imatrix_for(t, cfg, text)
        dest = work / f"llama.cpp-equivalent-{t}{'-imatrix' if im else ''}.gguf"
        if not dest.is_file():
            if im and ids is None:
                ids = calibration_ids(teacher, tok, CalibConfig(n_samples=cfg.calib_samples, seq_len=cfg.calib_len, seed=cfg.seed,
                                                                source=str(text.calib)))
            model = copy.deepcopy(teacher)
            method = "imatrix" if im else "rtn"
            grid = Grid.for_gguf(base_type(t))
            q = quantize(model, method, QUANTIZERS.get(method).config(grid=grid), ids if im else None, embeddings=True,
                         grids=gguf_grids(model, t, imatrix=im), gguf=t)
            _atomic(dest, lambda tmp: export_gguf_validated(model, tok, tmp, t, q, check_loader=False, imatrix=im))
            del model
        method = (f"slmkit's {'imatrix' if im else 'rtn'} writer at {t}: llama-quantize's tensor types and rounding"
                  + (f" with an importance matrix ({cfg.calib_samples} x {cfg.calib_len} calibration tokens)" if im else ""))
        out.append(Candidate(f"llama.cpp-equiv. {t}{'+imatrix' if im else ''}", dest, "baseline", method, t))
    return out


def _llamacpp_tools() -> bool:
    from slmkit.export import llamacpp

    return llamacpp.tools() is not None


BASELINES.add("llama.cpp", BaselineMaker(llamacpp_baselines, _llamacpp_tools, "llama.cpp's llama-quantize (and llama-imatrix)"))
BASELINES.add("slmkit", BaselineMaker(slmkit_baselines, lambda: True,
                                      "slmkit's rtn/imatrix GGUF writers, which reproduce llama-quantize (llama.cpp is not installed here)"))


def reference_file(teacher, tok, work: Path) -> Path:
    """The teacher as an F32 GGUF file (validated by reading it back): the reference and the "teacher" candidate."""
    from slmkit.export.gguf import export_gguf_validated

    return _atomic(work / "teacher-F32.gguf", lambda tmp: export_gguf_validated(teacher, tok, tmp, "F32", check_loader=False))


def file_facts(path: Path) -> dict:
    """Bytes, parameters, bits per weight (as llama.cpp counts them) and KV-cache bytes per token of a GGUF file."""
    from slmkit.export.gguf_mix import bits_per_weight, types_from_gguf
    from slmkit.models import describe, load_config

    config = load_config(str(path))
    facts = describe(config)
    size = path.stat().st_size
    try:
        bpw = bits_per_weight(config, {k: v for k, v in types_from_gguf(path).items() if not k.endswith("norm.weight")})
    except (ConfigError, KeyError):
        bpw = 8 * size / facts.parameters
    return {"bytes": size, "parameters": facts.parameters, "layers": facts.layers, "bits_per_weight": bpw,
            "kv_bytes_per_token": facts.kv_cache_bytes_per_1k_tokens["bf16"] / 1024}


def _quality(q: Quality) -> dict:
    return {"perplexity": q.perplexity, "perplexity_err": q.perplexity_err, "kl_divergence": q.kl_divergence,
            "kl_divergence_err": q.kl_divergence_err, "top1_agreement": q.top1_agreement,
            "top1_agreement_err": q.top1_agreement_err, "tokens_scored": q.tokens}


def add_memory(rows: Sequence[dict], context: int, measured_tokens: int | None) -> None:
    """``memory_bytes`` of each row at ``context`` tokens: the measured peak of a process running the file
    plus the KV cache of the tokens beyond those measured; without a measurement, the file, the KV
    cache and slmkit.runtime.fit's runtime overhead. In place."""
    from slmkit.runtime.fit import RUNTIME_OVERHEAD

    for r in rows:
        if r.get("peak_memory_bytes") and measured_tokens is not None:
            extra = max(0, context - measured_tokens)
            r["memory_bytes"] = int(r["peak_memory_bytes"] + r["kv_bytes_per_token"] * extra)
            r["memory_measured"] = True
        else:
            r["memory_bytes"] = int(r["bytes"] + r["kv_bytes_per_token"] * context + RUNTIME_OVERHEAD)
            r["memory_measured"] = False
        r["memory_context"] = context


def _speeds(rows: list[dict], cfg: CompareConfig, teacher_spec: str | None, step: Callable[[int], None]) -> None:
    """Fast-path speed and peak memory of every row, in place.

    Peak memory: each file alone in a fresh process (one timing round). Speed: all files in one more
    process, timed round-robin (:func:`~slmkit.eval.gguf_speed.interleaved_speeds`), so that the
    machine's other load falls on every file alike; a file's speed is its best round.
    """
    from dataclasses import replace

    from slmkit.eval.gguf_speed import interleaved_speeds_isolated

    ok = []
    for i, row in enumerate(rows):
        sp = fast_speed_isolated(row["path"], replace(cfg.speed, repeats=1), reference=teacher_spec)
        step(i + 1)
        if "error" in sp:
            log.warning("fast path could not run %s: %s", Path(row["path"]).name, sp["error"])
            row["speed_error"] = sp["error"]
            continue
        row.update(peak_memory_bytes=sp["peak_memory_bytes"], fast_weight_bytes=sp["weight_bytes"],
                   speed_threads=sp["threads"], fused_decode=sp["fused_decode"], fast_weights=sp["weights"])
        ok.append(row)
    speeds = interleaved_speeds_isolated([r["path"] for r in ok], cfg.speed, reference=teacher_spec) if ok else {}
    step(len(rows) + 1)
    if "error" in speeds:
        log.warning("fast-path speed measurement failed: %s", speeds["error"])
        for r in ok:
            r["speed_error"] = speeds["error"]
        return
    for r in ok:
        sp = speeds[str(r["path"])]
        if "error" in sp:
            r["speed_error"] = sp["error"]
            continue
        r.update({k: sp[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "decode_median_tokens_per_s",
                                      "prefill_median_tokens_per_s", "decode_runs", "prefill_runs")})


def reference_row(rows: Sequence[dict]) -> dict | None:
    """The baseline a build's files are held against: the teacher's Q4_K_M, else the last baseline."""
    refs = [r for r in rows if r["role"] == "baseline"]
    return next((r for r in refs if r.get("file_type") == "Q4_K_M"), refs[-1] if refs else None)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _task_notes(rows: Sequence[dict], tasks, ref: dict | None) -> list[str]:
    """One sentence per task: do the candidates' differences exceed their intervals?"""
    notes = []
    for t in tasks:
        res = [(r["name"], r["tasks"][t.name]) for r in rows]
        accs = [v["acc"] for _, v in res]
        lo_max, hi_min = max(v["ci95"][0] for _, v in res), min(v["ci95"][1] for _, v in res)
        half = max((v["ci95"][1] - v["ci95"][0]) / 2 for _, v in res)
        head = (f"{t.name} ({len(t.items)} items, chance {_pct(_chance(t))}): accuracy {_pct(min(accs))} to {_pct(max(accs))} "
                f"across the candidates, 95% intervals up to \u00b1{100 * half:.1f} points")
        head += ("; the differences are inside the intervals (all intervals overlap)" if lo_max <= hi_min
                 else "; not all intervals overlap")
        teacher = res[0][1]
        if teacher["ci95"][0] <= _chance(t):
            head += "; the teacher itself is not above chance here, so this task says little about these files"
        if ref is not None:
            sig = [f"{n} {100 * v['vs_reference']['diff']:+.1f} points "
                   f"[{100 * v['vs_reference']['ci95'][0]:+.1f}, {100 * v['vs_reference']['ci95'][1]:+.1f}], "
                   f"McNemar p = {v['vs_reference']['p_value']:.3f}"
                   for n, v in res if v.get("vs_reference") and v["vs_reference"]["p_value"] < 0.05]
            head += (f". Paired against {ref['name']} on the same items: " +
                     ("; ".join(sig) if sig else "no candidate differs from it at the 5% level (McNemar)"))
        notes.append(head + ".")
    return notes


def _chance(task) -> float:
    from slmkit.eval.tasks import chance

    return chance(task.items)


def load_like(path: str | Path, teacher, tok):
    """(model, tokenizer) of GGUF file ``path``, dequantised, fp32.

    When the file holds exactly ``teacher``'s tensors (by name and shape: a quantisation of it), they
    are dequantised by gguf's reference code (:func:`slmkit.export.gguf.read_gguf_weights`, what
    transformers' GGUF loader runs too) into a copy of ``teacher``, and ``tok`` is the tokenizer: the
    same model as :func:`slmkit.models.load` gives, without rebuilding the config and tokenizer from
    the file (~15 s for the default model). Any other file is loaded through :func:`slmkit.models.load`.
    """
    import gguf

    from slmkit.export.gguf import gguf_name, read_gguf_weights
    from slmkit.models import load

    state = teacher.state_dict()
    tied = getattr(teacher.config, "tie_word_embeddings", False)
    want = {k: v.shape for k, v in state.items() if not (k == "lm_head.weight" and tied)}
    reader = gguf.GGUFReader(str(path))
    if {t.name for t in reader.tensors} != {gguf_name(k) for k in want}:
        return load(str(path))
    weights = read_gguf_weights(path, teacher.config, reader)
    if set(weights) != set(want) or any(weights[k].shape != want[k] for k in want):
        return load(str(path))
    model = copy.deepcopy(teacher).float().eval()
    model.load_state_dict(weights, strict=not tied)
    return model, tok


def _task_scores(rows: list[dict], cfg: TaskConfig, step: Callable[[int], None], teacher=None, tok=None) -> dict:
    """Downstream task scores of every row's file, in place (``row["tasks"]``); what was done, for the report."""
    from slmkit.backends.hf import HFBackend
    from slmkit.eval.downstream import load_tasks, score_model, summary
    from slmkit.eval.tasks import paired_difference
    from slmkit.models import load

    try:
        tasks = load_tasks(cfg)
    except DataError as err:
        why = f"downstream tasks skipped: {err.problem}" + (f" ({err.hint})" if err.hint else "")
        log.warning("candidates: %s", why)
        return {"skipped": why, "names": list(cfg.names)}
    results = []
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        model, mtok = load_like(r["path"], teacher, tok) if teacher is not None else load(str(r["path"]))
        res = score_model(HFBackend(model, mtok, name=r["name"]), tasks)
        del model
        r["tasks"] = {n: summary(v) for n, v in res.items()}
        r["tasks_seconds"] = time.perf_counter() - t0
        results.append(res)
        step(i + 1)
    ref = reference_row(rows)
    ref_res = results[rows.index(ref)] if ref is not None else None
    for r, res in zip(rows, results):
        for n, v in res.items():
            teacher = results[0][n]
            r["tasks"][n]["agreement_with_teacher"] = sum(a == b for a, b in zip(v.predictions, teacher.predictions)) / v.n
            if ref_res is not None and r is not ref:
                r["tasks"][n]["vs_reference"] = paired_difference(v.correct, ref_res[n].correct)
    return {"tasks": {t.name: t.describe() for t in tasks}, "items": cfg.items,
            "reference": None if ref is None else ref["name"], "notes": _task_notes(rows, tasks, ref), "skipped": None}


def pick_maker(name: str) -> str:
    if name == "auto":
        return "llama.cpp" if BASELINES.get("llama.cpp").available() else "slmkit"
    if not BASELINES.get(name).available():
        from slmkit.export.llamacpp import HOW

        raise ConfigError(f"baseline maker {name!r} is not available here", HOW)
    return name


def compare(teacher, tok, artefacts: Sequence[Candidate], text: HeldOutText, cfg: CompareConfig, work: str | Path,
            progress: Callable[[int, int], None] = lambda done, total: None, teacher_spec: str | None = None) -> Comparison:
    """Measure the teacher, its baselines and ``artefacts`` side by side (see the module docstring).

    ``teacher`` is the in-memory model (never modified); files are written into ``work`` and reused
    when present (an interrupted run picks them up). Rows follow the order teacher, baselines,
    artefacts. ``teacher_spec`` (how to load the teacher) lets the speed measurement take config and
    norms from it for files with the teacher's skeleton instead of dequantising each file.
    """
    from slmkit.eval.heldout import SCORERS, pick_scorer

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    names = [a.name for a in artefacts]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate names must be unique, got {names}")
    maker = pick_maker(cfg.maker)
    scorer = pick_scorer(cfg.scorer)
    n_rows = 1 + len(cfg.baselines) + len(artefacts)
    tasks_on = cfg.tasks is not None and bool(cfg.tasks.names)
    steps = 3 + (n_rows + 1 if cfg.speed else 0) + (n_rows if tasks_on else 0)
    progress(0, steps)
    ref = reference_file(teacher, tok, work)
    teacher_c = Candidate("teacher (F32)", ref, "teacher", "the teacher, unquantised (F32 GGUF)", "F32")
    baselines = BASELINES.get(maker).make(ref, teacher, tok, cfg.baselines, text, cfg, work)
    progress(1, steps)
    cands = [teacher_c, *baselines, *artefacts]
    clash = {c.name for c in baselines} & set(names)
    if clash:
        raise ConfigError(f"an artefact is named like a baseline: {sorted(clash)[0]}")
    scorer, ref_q, quals = score(ref, [c.path for c in cands[1:]], text.eval, cfg.score, work, scorer)
    progress(2, steps)
    rows = [{"name": c.name, "path": c.path, "role": c.role, "baseline": c.baseline, "method": c.method,
             "file_type": c.file_type, "stage": c.stage, **file_facts(c.path), **_quality(q)}
            for c, q in zip(cands, [ref_q, *quals])]
    tasks = _task_scores(rows, cfg.tasks, lambda done: progress(2 + done, steps), teacher, tok) if tasks_on else None
    if cfg.speed is not None:
        first = 3 + (len(rows) if tasks_on else 0)
        _speeds(rows, cfg, teacher_spec, lambda done: progress(first + done, steps))
    progress(steps, steps)
    return Comparison(rows, scorer, SCORERS.get(scorer).what, maker, BASELINES.get(maker).what, text.source,
                      ref_q.tokens, tasks=tasks)

"""Held-out text and the candidates stage: every artefact of the run against the baselines, and a recommendation.

``heldout`` splits a text by lines into a calibration part and a disjoint evaluation part (slot
``text``): calibration (``calib: auto``) of later prune/quantize stages uses the first, every
quality number the second. ``candidates`` is thin glue over :func:`slmkit.eval.candidates.compare`
(the teacher, its baselines at the target's file types, every GGUF file the run exported) and
:func:`slmkit.eval.recommend.recommend` (the candidate that wins for the target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slmkit.errors import ConfigError
from slmkit.eval.candidates import BaselineSettings
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)

#: stages whose presence in a model's lineage makes it a smaller-architecture student
STUDENT_KINDS = ("prune", "distill", "lowrank", "sft")


@dataclass(frozen=True)
class HeldOutConfig:
    source: str = "wikitext"  #: "wikitext" (WikiText-2 test from the shared data) or a text file
    calib_fraction: float = 0.2  #: the first fraction of the lines calibrates; the rest is held out for evaluation

    def __post_init__(self):
        if not 0 < self.calib_fraction < 1:
            raise ConfigError(f"calib_fraction must be in (0, 1), got {self.calib_fraction}")
        if self.source != "wikitext" and not Path(self.source).is_file():
            raise ConfigError(f"source {self.source!r} is neither 'wikitext' nor an existing text file")


def _source_path(source: str) -> tuple[Path, str]:
    """(path, name for the report: no machine paths)."""
    if source == "wikitext":
        from slmkit.data import data_file

        return data_file("wikitext-2/test.txt"), "WikiText-2 test (wikitext-2/test.txt)"
    return Path(source), Path(source).name


@stage("heldout", HeldOutConfig, makes=("text",))
def heldout(ctx: Context, cfg: HeldOutConfig) -> StageResult:
    """Split a text by lines: calibration (``calib.txt``) and held-out evaluation text (``eval.txt``), disjoint."""
    from slmkit.artefact import atomic_file
    from slmkit.eval import read_text
    from slmkit.eval.heldout import split_lines
    from slmkit.models import load_tokenizer

    path, name = _source_path(cfg.source)
    calib, evalt = split_lines(read_text(path), cfg.calib_fraction)
    for fname, body in (("calib.txt", calib), ("eval.txt", evalt)):
        with atomic_file(ctx.work / fname) as tmp:
            tmp.write_text(body, encoding="utf-8")
    tok = load_tokenizer(ctx.resolve(ctx.slots["teacher"]))
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    return StageResult(outputs={"text": ctx.rel(ctx.work)},
                       metrics={"source": name, "calib_fraction": cfg.calib_fraction, "calib_lines": calib.count("\n") + 1,
                                "eval_lines": evalt.count("\n") + 1, "calib_tokens": count(calib), "eval_tokens": count(evalt)})


@dataclass(frozen=True)
class CandidatesStageConfig(BaselineSettings):
    """The baselines' keys (baselines, imatrix, calib_samples, calib_len, maker, scorer) are
    :class:`~slmkit.eval.candidates.BaselineSettings`' fields; the rest below."""

    text: str = "heldout"  #: evaluation text: heldout (the heldout stage's split) | generated (gen-data's held-out answers) | a file
    context: int = 512  #: scoring window (tokens); its second half is scored
    chunks: int = 20  #: scoring windows (chunks * context / 2 tokens per candidate)
    speed: bool = True  #: decode/prefill tokens/s and peak memory on slmkit's fast path
    prompt_tokens: int = 256  #: speed: prefill length
    new_tokens: int = 64  #: speed: decode steps
    repeats: int = 10  #: speed: timed rounds per file, all files round-robin in one process (the best is reported, the median kept)
    tasks: tuple[str, ...] = ()  #: downstream multiple-choice tasks scored on every file (slmkit.eval.downstream.TASKS)
    task_items: int = 100  #: items per task, evenly spaced through its data set (0: all)
    target: str = ""  #: the target's name in the report (e.g. phone-4gb)
    objective: Literal["quality", "size", "speed"] = "quality"  #: what the recommendation optimises
    max_size: str | None = None  #: largest file, e.g. 120MB
    memory: str | None = None  #: memory budget: a size (e.g. 1.8GB) or a device of slmkit.runtime.fit (phone-4gb, ...)
    fit_context: int = 2048  #: tokens of KV cache counted in memory
    max_kl_divergence: float | None = None  #: quality floor (mean KL divergence to the teacher)
    min_speedup: float | None = None  #: decode at least this multiple of the teacher's tokens/s
    types: tuple[str, ...] = ()  #: allowed file types (empty: any)
    beat: str | None = None  #: a baseline type (e.g. Q4_K_M) whose KL divergence a candidate must be below
    speed_tolerance: float = 0.05  #: decode-speed gap counted as equal (noise of a shared machine)

    def __post_init__(self):
        if self.text not in ("heldout", "generated") and not Path(self.text).is_file():
            raise ConfigError(f"text {self.text!r} is neither heldout, generated nor an existing file")
        if (self.objective == "speed" or self.min_speedup) and not self.speed:
            raise ConfigError("a speed objective or min_speedup needs speed: true")
        self.compare_config(0)
        self.target_config()
        if self.beat is not None and self.beat not in self.baselines:
            raise ConfigError(f"beat: {self.beat} is not among the baselines ({', '.join(self.baselines)})", f"add {self.beat} to baselines")

    def compare_config(self, seed: int, threads: int | None = None):
        from slmkit.eval.candidates import CompareConfig
        from slmkit.eval.gguf_speed import SpeedConfig
        from slmkit.eval.heldout import ScoreConfig

        from slmkit.eval.downstream import TaskConfig

        speed = SpeedConfig(self.prompt_tokens, self.new_tokens, self.repeats, threads, seed) if self.speed else None
        tasks = TaskConfig(tuple(self.tasks), self.task_items) if self.tasks else None
        return CompareConfig(**self.baseline_settings(), score=ScoreConfig(self.context, self.chunks, threads),
                             speed=speed, tasks=tasks, seed=seed)

    def target_config(self):
        from slmkit.eval.recommend import Target
        from slmkit.runtime.fit import DEVICES, parse_size

        memory = None
        if self.memory is not None:
            dev = DEVICES.get(self.memory.lower())
            memory = dev.usable_bytes if dev is not None else parse_size(self.memory)
        return Target(objective=self.objective, max_bytes=parse_size(self.max_size) if self.max_size else None,
                      memory_bytes=memory, context=self.fit_context, max_kl_divergence=self.max_kl_divergence,
                      min_speedup=self.min_speedup, types=self.types, beat=self.beat, speed_tolerance=self.speed_tolerance,
                      label=self.target or (self.memory or ""))


def _needs(cfg: CandidatesStageConfig) -> tuple[str, ...]:
    return {"heldout": ("teacher", "text"), "generated": ("teacher", "data")}.get(cfg.text, ("teacher",))


def _text(ctx: Context, cfg: CandidatesStageConfig):
    from slmkit.eval.candidates import HeldOutText

    calib = Path(ctx.slot("text")) / "calib.txt" if "text" in ctx.slots else None
    if cfg.text == "heldout":
        rec = _maker_of(ctx, "text", ctx.slots["text"])
        source = (rec or {}).get("metrics", {}).get("source", "held-out text")
        return HeldOutText(Path(ctx.slot("text")) / "eval.txt", calib, f"{source}, the lines after the calibration split")
    if cfg.text == "generated":
        from slmkit.pipeline.stages.data import data_paths

        _, evalf, calibf = data_paths(ctx)
        return HeldOutText(evalf, calib or calibf, "the teacher's held-out generated answers")
    return HeldOutText(Path(cfg.text), calib, Path(cfg.text).name)


def _maker_of(ctx: Context, slot: str, value: str) -> dict | None:
    """The latest earlier stage whose output ``slot`` is ``value``."""
    return next((r for r in reversed(ctx.history) if r.get("outputs", {}).get(slot) == value), None)


def lineage(ctx: Context, model_value: str) -> list[dict]:
    """The stages that made the model ``model_value``, oldest first (student, prune, distill, quantize, ...)."""
    chain, seen = [], set()
    value = model_value
    while value not in seen:
        seen.add(value)
        rec = _maker_of(ctx, "model", value)
        if rec is None:
            break
        chain.append(rec)
        value = rec.get("inputs", {}).get("model")
        if value is None or rec["kind"] == "student":  # a student stage starts a model afresh from its source
            break
    return chain[::-1]


def _artefact_name(chain: list[dict], ftype: str) -> str:
    words = []
    for rec in chain:
        kind, m = rec["kind"], rec.get("metrics", {})
        if kind == "quantize":
            words.append(str(m.get("method", "quantize")).upper() if m.get("method") in ("gptq", "awq") else m.get("method", kind))
        elif kind in STUDENT_KINDS:
            words.append(kind)
    return "slmkit " + ("+".join(words) + " " if words else "") + ftype


def artefacts(ctx: Context) -> tuple[list, list[str]]:
    """(a Candidate per GGUF file the run exported, notes on models that were not exported)."""
    from slmkit.eval.candidates import Candidate

    out, notes, names = [], [], set()
    exported = set()
    for rec in ctx.history:
        gg = rec.get("outputs", {}).get("gguf")
        if not gg:
            continue
        chain = lineage(ctx, rec.get("inputs", {}).get("model", ""))
        exported.add(rec.get("inputs", {}).get("model"))
        ftype = rec.get("metrics", {}).get("type", "?")
        name = _artefact_name(chain, ftype)
        if name in names:
            name = f"{name} ({rec['name']})"
        names.add(name)
        how = " -> ".join(f"{r['kind']}" + (f" {r['metrics'].get('method')}" if r.get("metrics", {}).get("method") else "")
                          for r in chain if r["kind"] != "student")
        out.append(Candidate(name, ctx.run_dir / gg, "artefact", f"the teacher -> {how or 'unchanged'} -> GGUF {ftype}",
                             ftype, rec["dir"]))
    final = ctx.slots.get("model")
    if final and final != ctx.slots["teacher"] and final not in exported:
        notes.append(f"the run's final model ({final}) has no GGUF export, so it is not a candidate: add an export stage")
    return out, notes


def _versus(rows: list[dict], rec_name: str | None, tol: float) -> dict | None:
    """The recommendation against the teacher's reference Q4_K_M (or the last baseline): does it dominate it?"""
    from slmkit.eval.candidates import reference_row
    from slmkit.eval.recommend import dominates

    if rec_name is None:
        return None
    best = next(r for r in rows if r["name"] == rec_name)
    ref = reference_row(rows)
    if ref is None or ref is best:
        return {"baseline": None if ref is None else ref["name"], "recommended_is_baseline": ref is best}
    se = ((best.get("kl_divergence_err") or 0) ** 2 + (ref.get("kl_divergence_err") or 0) ** 2) ** 0.5
    speed = (best["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
             if best.get("decode_tokens_per_s") and ref.get("decode_tokens_per_s") else None)
    return {"baseline": ref["name"], "dominates": dominates(best, ref, tol), "bytes_ratio": best["bytes"] / ref["bytes"],
            "decode_speed_ratio": speed, "kl_divergence": best["kl_divergence"], "baseline_kl_divergence": ref["kl_divergence"],
            "kl_divergence_ratio": best["kl_divergence"] / ref["kl_divergence"] if ref["kl_divergence"] else None,
            "kl_difference_in_se": (ref["kl_divergence"] - best["kl_divergence"]) / se if se else None,
            "recommended_is_baseline": False}


def _student_notes(ctx: Context, rows: list[dict], front: list[str], tol: float) -> list[str]:
    """Say when a prune/distill student did not pay for its pruning: it is dominated by another
    candidate, or it misses the target's constraints (e.g. worse than the baseline it must beat)."""
    from slmkit.eval.recommend import dominates

    notes = []
    for r in rows:
        if r["role"] != "artefact" or (r["name"] in front and not r.get("misses")):
            continue
        chain = lineage(ctx, next((h.get("inputs", {}).get("model") for h in ctx.history if h["dir"] == r["stage"]), None) or "")
        if not any(h["kind"] in STUDENT_KINDS for h in chain):
            continue
        steps = sum(h.get("metrics", {}).get("steps") or 0 for h in chain if h["kind"] == "distill")
        by = next((o["name"] for o in rows if o is not r and dominates(o, r, tol)), None)
        why = (f"is dominated by {by} (larger KL divergence at no smaller size or higher speed)" if by is not None else
               f"misses the target ({'; '.join(map(str, r['misses']))}) at KL divergence {r.get('kl_divergence', float('nan')):.4g}")
        notes.append(f"{r['name']} {why}: its healing budget ({steps} distillation steps) was too small to pay for "
                     "the pruning here; prune-and-distill pays with a GPU and far more training tokens")
    return notes


@stage("candidates", CandidatesStageConfig, needs=_needs)
def candidates(ctx: Context, cfg: CandidatesStageConfig) -> StageResult:
    """The teacher, its reference quantisations and every GGUF file of the run, measured alike; the recommendation."""
    import torch

    from slmkit.eval.candidates import add_memory, compare
    from slmkit.eval.recommend import recommend

    teacher, tok = ctx.teacher()
    arts, notes = artefacts(ctx)
    text = _text(ctx, cfg)
    ccfg = cfg.compare_config(ctx.recipe.seed, torch.get_num_threads())
    result = compare(teacher, tok, arts, text, ccfg, ctx.work, ctx.progress, teacher_spec=ctx.resolve(ctx.slots["teacher"]))
    target = cfg.target_config()
    rows = result.rows
    add_memory(rows, target.context, cfg.prompt_tokens + cfg.new_tokens if cfg.speed else None)
    for r in rows:
        r["path"] = ctx.rel(r["path"])
    rec = recommend(rows, target)
    for r in rows:
        r["recommended"] = r["name"] == rec.name
        r["pareto"] = r["name"] in rec.front
        r["meets_target"] = r["name"] in rec.feasible
        r["misses"] = rec.misses.get(r["name"], [])
    notes += _student_notes(ctx, rows, rec.front, target.speed_tolerance)
    for w in rec.warnings:
        log.warning("candidates: %s", w)
    metrics = {
        "candidates": rows,
        "recommended": rec.name,
        "recommendation": {"name": rec.name, "reason": rec.reason, "target": rec.target, "target_name": target.label,
                           "objective": target.objective, "feasible": rec.feasible, "pareto_front": rec.front,
                           "warnings": rec.warnings},
        "versus_reference": _versus(rows, rec.name, target.speed_tolerance),
        "scorer": result.scorer, "scorer_what": result.scorer_what, "maker": result.maker, "maker_what": result.maker_what,
        "text": result.text, "tokens_scored": result.tokens, "context": cfg.context, "chunks": cfg.chunks,
        "threads": torch.get_num_threads(), "speed": {"prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                                                      "repeats": cfg.repeats} if cfg.speed else None,
        "tasks": result.tasks,
        "notes": notes,
    }
    return StageResult(metrics=metrics)

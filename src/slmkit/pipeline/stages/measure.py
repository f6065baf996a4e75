"""Measuring stages: evaluation of the teacher, every stage's model and the export."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.errors import ConfigError
from slmkit.eval.efficiency import EfficiencyConfig
from slmkit.eval.perplexity import PerplexityConfig
from slmkit.pipeline.base import Context, StageResult, stage
from slmkit.pipeline.stages.model import dir_bytes

log = logging.getLogger(__name__)

TEXT_KEYWORDS = ("generated", "wikitext")


@dataclass(frozen=True)
class EvalMeasures:
    """The library configs the eval stage runs: perplexity scoring and the speed measurement."""

    perplexity: PerplexityConfig
    efficiency: EfficiencyConfig


@dataclass(frozen=True)
class EvalConfig:
    text: str = "generated"  #: "generated" (held-out teacher answers), "wikitext" (shared WikiText-2 test) or a text file
    max_tokens: int = 2048  #: tokens of the text scored per model
    context: int = 256  #: perplexity window (tokens); windows do not overlap
    every_stage: bool = True  #: also score the model each earlier stage made (quality vs size)
    efficiency: bool = True  #: measure prefill/decode speed of the teacher and the final student
    prompt_tokens: int = 64  #: efficiency prefill length
    new_tokens: int = 32  #: efficiency decode length
    fit_context: int = 2048  #: context length assumed for memory (weights + KV cache) and device fit
    presets: tuple[str, ...] = ("phone-4gb", "rpi5-4gb", "laptop-16gb")  #: devices of slmkit.runtime.fit to check
    options: dict = field(default_factory=dict)  #: any other field of PerplexityConfig / EfficiencyConfig, e.g.
    #: {perplexity: {add_bos: true}, efficiency: {repeats: 5}}

    def __post_init__(self):
        from slmkit.runtime.fit import DEVICES

        for p in self.presets:
            if p not in DEVICES:
                raise ConfigError(f"unknown device preset {p!r}; known: {', '.join(DEVICES)}")
        if self.text not in TEXT_KEYWORDS and not Path(self.text).is_file():
            raise ConfigError(f"text {self.text!r} is neither a keyword ({', '.join(TEXT_KEYWORDS)}) nor an existing file")
        if self.max_tokens < 16 or self.context < 8:
            raise ConfigError("max_tokens must be >= 16 and context >= 8")
        if self.prompt_tokens < 1 or self.new_tokens < 1 or self.fit_context < 1:
            raise ConfigError("prompt_tokens, new_tokens and fit_context must be >= 1")
        self.measures(0)

    def measures(self, seed: int) -> EvalMeasures:
        """The stage's keys plus ``options:`` as :class:`EvalMeasures` (through the typed builder)."""
        from slmkit.pipeline.typed import library_config

        given = {"perplexity": {"context": self.context, "stride": self.context, "max_tokens": self.max_tokens},
                 "efficiency": {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "seed": seed}}
        return library_config(EvalMeasures, given, self.options)


def _needs_eval(cfg: EvalConfig) -> tuple[str, ...]:
    return ("model", "data") if cfg.text == "generated" else ("model",)


def eval_text(ctx: Context, which: str) -> tuple[str, str]:
    """(text, source) for ``generated`` / ``wikitext`` / a file path."""
    from slmkit.data import data_file
    from slmkit.eval import read_text

    if which == "generated":
        from slmkit.pipeline.stages.data import data_paths

        path = data_paths(ctx)[1]
    elif which == "wikitext":
        path = data_file("wikitext-2/test.txt")
    else:
        path = Path(which)
    return read_text(path), str(path)


@torch.inference_mode()
def next_token_argmax(model, ids: torch.Tensor, context: int) -> torch.Tensor:
    """The model's greedy next-token choice at every position, in non-overlapping windows. ids: (N,) -> (N,)"""
    out = []
    for start in range(0, ids.numel(), context):
        window = ids[start : start + context][None]  # (1, T)
        out.append(model(window).logits[0].argmax(-1))  # (T,)
    return torch.cat(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two models pick the same next token (top-1 agreement)."""
    return float((a == b).float().mean().item())


def _same_vocab(tok_a, tok_b) -> bool:
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def _model_rows(ctx: Context, cfg: EvalConfig) -> list[dict]:
    """Which models to measure: the teacher, each earlier stage's model, the GGUF export."""
    teacher = ctx.slots["teacher"]
    rows = [{"label": "teacher", "role": "teacher", "spec": teacher, "stage": None}]
    seen = {teacher}
    final_model = ctx.slots["model"]
    for rec in ctx.history:
        value = rec.get("outputs", {}).get("model")
        if value is None or value in seen or (value != final_model and not cfg.every_stage):
            continue
        rows.append({"label": rec["name"], "role": "stage", "spec": value, "stage": rec["dir"]})
        seen.add(value)
    if final_model == teacher:  # the student is still the teacher (e.g. only quantized at export)
        rows.append({"label": "student (= teacher)", "role": "student", "spec": teacher, "stage": None})
    else:
        next(r for r in rows if r["spec"] == final_model)["role"] = "student"
    if "gguf" in ctx.slots:
        gg = next(r for r in reversed(ctx.history) if r.get("outputs", {}).get("gguf") == ctx.slots["gguf"])
        rows.append({"label": f"{gg['name']} (gguf)", "role": "export", "spec": ctx.slots["gguf"], "stage": gg["dir"]})
    return rows


def _is_quantized(path: str) -> bool:
    from slmkit.compress.qstore import is_quantized_dir

    return Path(path).is_dir() and is_quantized_dir(path)


def _disk_bytes(ctx: Context, spec: str) -> int:
    from slmkit.models import resolve

    src = resolve(ctx.resolve(spec))
    if src.gguf_file:
        return dir_bytes(Path(src.path) / src.gguf_file)
    return dir_bytes(src.path) if src.kind == "dir" else 0


#: precision of the fit planner for each GGUF type (bits per weight incl. block scales, rounded up)
GGUF_PRECISION = {"F32": "fp32", "F16": "fp16", "Q8_0": "int8", "Q6_K": "int8", "Q5_0": "int8", "Q5_1": "int8", "Q5_K_M": "int8",
                  "Q5_K_S": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K_M": "int4", "Q4_K_S": "int4"}


def _precision(ctx: Context, row: dict) -> str:
    """The precision the model in ``row`` runs at: its GGUF type, its quantised bits, or the load dtype."""
    rec = next((r for r in ctx.history if r["dir"] == row["stage"]), None) if row["stage"] else None
    metrics = rec["metrics"] if rec else {}
    if row["role"] == "export" and metrics.get("type") in GGUF_PRECISION:
        return GGUF_PRECISION[metrics["type"]]
    if rec is not None and rec["kind"] == "quantize":
        return "int4" if metrics.get("bits", 8) <= 4 else "int8"
    return ctx.recipe.dtype


def device_fit(facts, label: str, precision: str, cfg: EvalConfig) -> dict:
    """{preset: fit} from :func:`slmkit.runtime.fit.plan_sizes` at ``cfg.fit_context``."""
    from slmkit.runtime.fit import FitConfig, Sizes, plan_sizes

    out = {}
    for preset in cfg.presets:
        r = plan_sizes(Sizes.of(facts), FitConfig.parse(preset, context=cfg.fit_context, precision=precision), label)
        out[preset] = {"fits": r.fits, "total_bytes": r.total_bytes, "memory_bytes": r.memory_bytes, "max_context": r.max_context}
    return out


@stage("eval", EvalConfig, needs=_needs_eval)
def evaluate(ctx: Context, cfg: EvalConfig) -> StageResult:
    """Perplexity, agreement with the teacher, size, memory, speed and device fit of the teacher and each stage's model."""
    from slmkit.eval import measure, perplexity
    from slmkit.models import describe_model

    text, source = eval_text(ctx, cfg.text)
    measures = cfg.measures(ctx.recipe.seed)
    pcfg, ecfg = measures.perplexity, measures.efficiency
    teacher, ttok = ctx.teacher()
    ids = ttok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][: cfg.max_tokens]
    teacher_pred = next_token_argmax(teacher, ids, cfg.context)
    rows = _model_rows(ctx, cfg)
    total = len(rows)
    for i, row in enumerate(rows):
        ctx.progress(i, total)
        same = row["spec"] == ctx.slots["teacher"]
        model, tok = (teacher, ttok) if same else ctx.load_spec(row["spec"])
        facts = describe_model(model)
        ppl = perplexity(model, tok, text, pcfg, source=source)
        row.update(
            parameters=facts.parameters,
            layers=facts.layers,
            hidden_size=facts.hidden_size,
            intermediate_size=facts.intermediate_size,
            bytes=_disk_bytes(ctx, row["spec"]),
            perplexity=ppl.perplexity,
            nll=ppl.nll,
            tokens_scored=ppl.tokens,
        )
        # weights in the format the model runs in: the file for a GGUF or packed 4-bit codes, else the load dtype
        packed = row["role"] == "export" or _is_quantized(ctx.resolve(row["spec"]))
        weights = row["bytes"] if packed else facts.weight_memory_bytes["bf16" if ctx.recipe.dtype == "bf16" else "fp32"]
        kv = facts.kv_cache_bytes_per_1k_tokens["bf16"] * cfg.fit_context // 1024
        row.update(weight_memory_bytes=weights, kv_cache_bytes=kv, memory_bytes=weights + kv)
        if _same_vocab(tok, ttok):
            sids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][: cfg.max_tokens]
            row["agreement"] = 1.0 if same else agreement(next_token_argmax(model, sids, cfg.context), teacher_pred)
        else:
            row["agreement"] = None
        if row["role"] in ("teacher", "student", "export") and cfg.presets:
            row["precision"] = _precision(ctx, row)
            row["fit"] = device_fit(facts, row["label"], row["precision"], cfg)
        if cfg.efficiency and row["role"] in ("teacher", "student"):
            eff = measure(model, ecfg)
            row.update(decode_tokens_per_s=eff.decode_tokens_per_s, prefill_tokens_per_s=eff.prefill_tokens_per_s)
        log.info("eval %s: ppl %.3f, agreement %s, %d params", row["label"], ppl.perplexity, row["agreement"], facts.parameters)
        if not same:
            del model
    ctx.progress(total, total)
    t = rows[0]
    s = next(r for r in rows if r["role"] == "student")
    summary = {
        "parameter_ratio": s["parameters"] / t["parameters"],
        "perplexity_ratio": s["perplexity"] / t["perplexity"],
    }
    if cfg.efficiency:
        summary["decode_speedup"] = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        summary["prefill_speedup"] = s["prefill_tokens_per_s"] / t["prefill_tokens_per_s"]
    return StageResult(metrics={"text": source, "tokens": int(ids.numel()), "context": cfg.context, "models": rows,
                                "fit_context": cfg.fit_context,
                                "summary": summary, "threads": torch.get_num_threads()})

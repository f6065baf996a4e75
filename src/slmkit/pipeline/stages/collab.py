"""The speculative-decoding check: a draft proposes tokens for the teacher (:mod:`slmkit.collab.speculative`).

The draft is the run's student, the GGUF file the candidates stage recommended, or a draft kind of
:data:`slmkit.collab.drafters.DRAFT_KINDS` made from the teacher itself: its own int4/int8 copy on the fast
path (self-speculation), its first N blocks, prompt lookup (``draft:``).

Greedy speculative decoding must emit exactly the teacher's own greedy tokens;
the stage checks that on a few prompts and measures the speed-up over the
teacher alone (same run, same dtype) and the draft acceptance rate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from slmkit.errors import ConfigError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)


#: drafts of the stage's own, besides the draft kinds (slmkit.collab.drafters.DRAFT_KINDS: int4, int8, lookup,
#: layers:N): the run's student, or the GGUF file the candidates stage recommended (its own blocks)
DRAFTS = ("student", "recommended")


@dataclass(frozen=True)
class SpeculativeStageConfig:
    prompts: int = 4  #: prompts to decode (held-out generated prompts if the recipe has data, else packaged ones)
    max_new_tokens: int = 48  #: tokens per prompt
    k: int = 4  #: first draft length
    adaptive: bool = True  #: choose the draft length from the running acceptance rate
    draft: str = "student"  #: student (the run's model) | recommended | a draft kind: int4 | int8 (the teacher's own
    #: copy, fast path) | layers:N | lookup (slmkit.collab.drafters.DRAFT_KINDS)
    options: dict = field(default_factory=dict)  #: any other field of SpecConfig (e.g. k_max, ngram_max, cost_ratio)

    def __post_init__(self):
        if self.prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("prompts and max_new_tokens must be >= 1")
        from slmkit.collab.drafters import DRAFT_KINDS, find_draft_kind

        if self.draft not in DRAFTS and find_draft_kind(self.draft) is None:
            raise ConfigError(f"draft must be one of {', '.join((*DRAFTS, *DRAFT_KINDS.names()))}, got {self.draft!r}")
        self.spec_config(())

    def spec_config(self, eos: tuple[int, ...]):
        from slmkit.collab.speculative import SpecConfig
        from slmkit.pipeline.typed import library_config

        given = {"max_new_tokens": self.max_new_tokens, "k": self.k, "adaptive": self.adaptive, "eos_token_ids": eos}
        return library_config(SpecConfig, given, self.options)


def _prompts(ctx: Context, n: int) -> list[str]:
    if "data" in ctx.slots:
        held = Path(ctx.slot("data")) / "heldout.jsonl"
        rows = [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [r["messages"][0]["content"] for r in rows]
    else:
        from slmkit.pipeline.stages.data import PACKAGED_PROMPTS

        prompts = [p for p in PACKAGED_PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    return prompts[:n]


def _draft(ctx: Context, cfg: SpeculativeStageConfig, teacher, ttok):
    """(the draft ``speculate`` takes, its description)."""
    from slmkit.collab.drafters import find_draft_kind, resolve_draft
    from slmkit.collab.speculative import check_same_tokenizer

    found = find_draft_kind(cfg.draft)
    if found is not None:  # made from the teacher itself, without prompt lookup
        kind, arg = found
        return kind.make(teacher, arg, False), kind.summary.format(target="teacher", arg=arg)
    if cfg.draft == "recommended":
        rec = next((r for r in reversed(ctx.history) if r["kind"] == "candidates"), None)
        name = rec and rec["metrics"].get("recommended")
        if not name:
            raise ConfigError("draft: recommended needs an earlier candidates stage that recommended a candidate")
        row = next(r for r in rec["metrics"]["candidates"] if r["name"] == name)
        return resolve_draft(str(ctx.run_dir / row["path"]), teacher, ttok), f"the recommended candidate ({name})"
    draft, dtok = ctx.load("model")
    check_same_tokenizer(ttok, dtok, "the teacher and the student")
    return draft, "the run's student model"


def _needs(cfg: SpeculativeStageConfig) -> tuple[str, ...]:
    return ("teacher", "model") if cfg.draft == "student" else ("teacher",)


@stage("speculative", SpeculativeStageConfig, needs=_needs)
def speculative(ctx: Context, cfg: SpeculativeStageConfig) -> StageResult:
    """A draft proposes, the teacher verifies: greedy output must equal the teacher's; speed-up and acceptance."""
    import torch

    from slmkit.backends.hf import render_prompt
    from slmkit.collab.speculative import autoregressive, speculate

    teacher, ttok = ctx.teacher()
    draft, what = _draft(ctx, cfg, teacher, ttok)
    eos = tuple(sorted({t for t in (ttok.eos_token_id, teacher.generation_config.eos_token_id) if isinstance(t, int)}))
    scfg = cfg.spec_config(eos)
    prompts = _prompts(ctx, cfg.prompts)
    base_s = spec_s = 0.0
    base_n = spec_n = drafted = accepted = 0
    identical = 0
    for i, p in enumerate(prompts):
        ctx.progress(i, len(prompts))
        chat = [{"role": "user", "content": p}] if getattr(ttok, "chat_template", None) else p
        ids = ttok(render_prompt(ttok, chat), add_special_tokens=isinstance(chat, str), return_tensors="pt").input_ids[0]
        if i == 0:  # warm-up, off the clock: first-call overheads (the verifying engine over a GGUF file's blocks is
            autoregressive(teacher, ids, replace(scfg, max_new_tokens=2))  # built on first use: seconds)
            speculate(teacher, draft, ids, replace(scfg, max_new_tokens=2))
        base = autoregressive(teacher, ids, scfg, torch.Generator().manual_seed(ctx.recipe.seed))
        out = speculate(teacher, draft, ids, scfg, torch.Generator().manual_seed(ctx.recipe.seed))
        identical += out.tokens == base.tokens
        base_s += base.seconds
        spec_s += out.seconds
        base_n += len(base.tokens)
        spec_n += len(out.tokens)
        drafted += out.drafted
        accepted += out.accepted
    ctx.progress(len(prompts), len(prompts))
    metrics = {
        "draft": cfg.draft,
        "draft_what": what,
        "prompts": len(prompts),
        "identical_to_teacher": identical,
        "exact": identical == len(prompts),
        "acceptance_rate": accepted / drafted if drafted else None,
        "baseline_tokens_per_s": base_n / base_s,
        "tokens_per_s": spec_n / spec_s,
        "speedup": (spec_n / spec_s) / (base_n / base_s),
        "tokens": spec_n,
        "max_new_tokens": cfg.max_new_tokens,
        "threads": torch.get_num_threads(),
    }
    log.info("speculative: %s", metrics)
    return StageResult(metrics=metrics)

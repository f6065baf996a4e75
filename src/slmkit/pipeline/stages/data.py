"""Data stages: teacher-generated data for distillation and evaluation."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, DataError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)

PACKAGED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.txt"


@dataclass(frozen=True)
class GenDataConfig:
    prompts: str = "packaged"  #: "packaged" (64 general instructions shipped with slmkit), or a .txt / .jsonl file
    n: int = 64  #: completions to generate (prompts are cycled when there are fewer)
    max_new_tokens: int = 96  #: tokens per completion at most
    temperature: float = 0.0  #: 0 = greedy; > 0 samples (seeded by the recipe's seed)
    holdout: float = 0.125  #: fraction of rows kept out of training and used as evaluation text

    def __post_init__(self):
        if self.n < 2:
            raise ConfigError(f"n must be >= 2, got {self.n}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.prompts != "packaged" and not Path(self.prompts).is_file():
            raise ConfigError(f"prompts file {self.prompts} does not exist", "use `prompts: packaged` or an existing file")


def read_prompts(spec: str) -> list[str]:
    """Prompts from the packaged list, a text file (one per line) or a jsonl file with "prompt"."""
    from slmkit.data import read_jsonl, read_lines

    path = PACKAGED_PROMPTS if spec == "packaged" else Path(spec)
    if path.suffix in (".jsonl", ".gz"):
        rows = read_jsonl(path, required=("prompt",))
        prompts = [str(r["prompt"]) for r in rows]
    else:
        prompts = [line.strip() for line in read_lines(path) if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts")
    return prompts


def _read_partial(path: Path) -> list[dict]:
    """Rows already written by an interrupted run (a torn last line is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


@stage("gen-data", GenDataConfig, makes=("data",))
def gen_data(ctx: Context, cfg: GenDataConfig) -> StageResult:
    """The teacher answers prompts; the answers become training and evaluation data.

    Checkpointed row by row: an interrupted run keeps what it wrote and
    continues from the next prompt. Writes ``train.jsonl`` (``{"messages"}``
    chats) and ``eval.txt`` (the held-out answers as plain text).
    """
    from slmkit.backends import GenParams, HFBackend

    prompts = read_prompts(cfg.prompts)
    partial = ctx.work / "rows.partial.jsonl"
    rows = _read_partial(partial)
    resumed = len(rows)
    if resumed:
        log.info("gen-data: resuming after %d of %d rows", resumed, cfg.n)
        partial.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ctx.progress(resumed, cfg.n)
    if resumed < cfg.n:
        model, tok = ctx.teacher()
        backend = HFBackend(model, tok, name=ctx.recipe.teacher)
        with open(partial, "a", encoding="utf-8") as fh:
            for i in range(resumed, cfg.n):
                prompt = prompts[i % len(prompts)]
                msgs = [{"role": "user", "content": prompt}] if getattr(tok, "chat_template", None) else prompt
                params = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=ctx.recipe.seed + i)
                c = backend.generate([msgs], params)[0]
                row = {"prompt": prompt, "completion": c.text.strip(), "tokens": c.tokens}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                rows.append(row)
                ctx.progress(i + 1, cfg.n)
    n_eval = max(1, round(cfg.n * cfg.holdout))
    train, held = rows[: cfg.n - n_eval], rows[cfg.n - n_eval :]
    if not any(r["completion"] for r in held):
        raise DataError(
            f"the teacher's {len(held)} held-out answers are all empty, so there is no evaluation text",
            "raise n or holdout, or set temperature > 0 so the teacher says something",
        )
    from slmkit.artefact import atomic_file

    with atomic_file(ctx.work / "eval.txt") as tmp:
        tmp.write_text("\n\n".join(r["completion"] for r in held if r["completion"]), encoding="utf-8")
    with atomic_file(ctx.work / "train.jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in train:
                msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
                fh.write(json.dumps({"messages": msgs, "prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    tokens = sum(r["tokens"] for r in rows)
    return StageResult(
        outputs={"data": ctx.rel(ctx.work)},
        metrics={"rows": len(rows), "train_rows": len(train), "eval_rows": len(held), "generated_tokens": tokens,
                 "resumed_after_rows": resumed, "prompts": cfg.prompts},
    )


def data_paths(ctx: Context) -> tuple[Path, Path]:
    """(train.jsonl, eval.txt) of the data slot."""
    root = Path(ctx.slot("data"))
    return root / "train.jsonl", root / "eval.txt"

"""Data stages: teacher-generated data for distillation and evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import ConfigError, DataError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)

PACKAGED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.txt"


@dataclass(frozen=True)
class GenDataConfig:
    prompts: str = "packaged"  #: "packaged" (64 general instructions shipped with slmkit), or a .txt / .jsonl prompts file
    n: int = 64  #: answers to keep (at most one per prompt)
    max_new_tokens: int = 96  #: tokens per completion at most
    temperature: float = 0.0  #: 0 = greedy; > 0 samples (seeded by the recipe's seed)
    holdout: float = 0.125  #: fraction of rows kept out of training and used as evaluation text
    options: dict = field(default_factory=dict)  #: any other field of SynthConfig (e.g. near_dup, batch_size)

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
        self.synth_config(0)

    def synth_config(self, seed: int):
        from slmkit.data.synth import SynthConfig
        from slmkit.pipeline.typed import library_config

        given = {"n": self.n, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": seed,
                 "min_words": 1}
        return library_config(SynthConfig, given, self.options)


def _read_partial(path: Path) -> list[dict]:
    """Rows already in a jsonl file that is appended row by row (a torn last line is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class _Counting:
    """A backend that reports each generate call as a step of the stage (``ctx.progress``)."""

    def __init__(self, backend, progress, done: int, total: int):
        self.backend, self.progress, self.done, self.total = backend, progress, done, total
        self.name = backend.name

    def generate(self, prompts, params):
        out = self.backend.generate(prompts, params)
        self.done += len(prompts)
        self.progress(min(self.done, self.total), self.total)
        return out

    def score(self, texts, contexts=None):
        return self.backend.score(texts, contexts)


def _reply(row: dict) -> str:
    return row["messages"][-1]["content"]


@stage("gen-data", GenDataConfig, makes=("data",))
def gen_data(ctx: Context, cfg: GenDataConfig) -> StageResult:
    """The teacher answers prompts (:func:`slmkit.data.synth.generate_dataset`); its answers become the data.

    ``generate_dataset`` appends and flushes one row at a time and skips
    prompts already answered, so an interrupted stage continues where it
    stopped. Writes ``train.jsonl`` (``{"messages"}`` chats), ``eval.txt`` (the
    held-out answers, as plain text; their chats in ``heldout.jsonl``) and ``calib.txt`` (the training chats as
    plain text, for calibration).
    """
    from slmkit.artefact import atomic_file
    from slmkit.backends import HFBackend
    from slmkit.data.synth import generate_dataset, read_prompts

    prompts = read_prompts(PACKAGED_PROMPTS if cfg.prompts == "packaged" else cfg.prompts)
    if cfg.n > len(prompts):
        raise DataError(f"n={cfg.n} but the prompts file has only {len(prompts)} prompts", f"set n <= {len(prompts)}")
    out = ctx.work / "all.jsonl"
    resumed = len(_read_partial(out))
    if resumed:
        log.info("gen-data: resuming after %d of %d rows", resumed, cfg.n)
    ctx.progress(resumed, cfg.n)
    scfg = cfg.synth_config(ctx.recipe.seed)
    model, tok = ctx.teacher()
    report = generate_dataset(_Counting(HFBackend(model, tok, name=ctx.recipe.teacher), ctx.progress, resumed, cfg.n),
                              prompts, out, scfg)
    rows = _read_partial(out)
    n_eval = max(1, round(len(rows) * cfg.holdout))
    if len(rows) < 2:
        raise DataError(f"the teacher gave only {len(rows)} usable answers", "raise n or max_new_tokens")
    train, held = rows[: len(rows) - n_eval], rows[len(rows) - n_eval :]
    train_path, eval_path, calib_path = data_paths_in(ctx.work)
    with atomic_file(eval_path) as tmp:
        tmp.write_text("\n\n".join(_reply(r) for r in held), encoding="utf-8")
    with atomic_file(calib_path) as tmp:
        tmp.write_text("\n\n".join(f"{r['messages'][0]['content']}\n{_reply(r)}" for r in train), encoding="utf-8")
    with atomic_file(ctx.work / "heldout.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in held), encoding="utf-8")
    with atomic_file(train_path) as tmp:
        tmp.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in train), encoding="utf-8")
    return StageResult(
        outputs={"data": ctx.rel(ctx.work)},
        metrics={"rows": len(rows), "train_rows": len(train), "eval_rows": len(held), "resumed_after_rows": resumed,
                 "generated_this_run": report.generated, "rejected": report.rejected, "prompts": cfg.prompts,
                 "eval_words": sum(len(_reply(r).split()) for r in held)},
    )


def data_paths_in(root: Path) -> tuple[Path, Path, Path]:
    return root / "train.jsonl", root / "eval.txt", root / "calib.txt"


def data_paths(ctx: Context) -> tuple[Path, Path, Path]:
    """(train.jsonl, eval.txt, calib.txt) of the data slot."""
    return data_paths_in(Path(ctx.slot("data")))

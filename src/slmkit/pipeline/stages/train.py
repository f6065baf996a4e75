"""Training stages: distillation (:mod:`slmkit.train.distill`) and supervised fine-tuning (:mod:`slmkit.train.sft`).

Both checkpoint inside the stage directory and resume from the newest complete
checkpoint when an interrupted build runs again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import ConfigError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)


def _progress_callback(ctx: Context):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ctx.progress(state.global_step, state.max_steps)

    return _Progress()


def _data_file(ctx: Context, data: str) -> Path:
    if data == "generated":
        from slmkit.pipeline.stages.data import data_paths

        return data_paths(ctx)[0]
    return Path(data)


def _check_data(data: str) -> None:
    if data != "generated" and not Path(data).is_file():
        raise ConfigError(f"data file {data} does not exist", "use data: generated (a gen-data stage's output) or an existing file")


def _needs_data(cfg) -> tuple[str, ...]:
    return ("model", "data") if cfg.data == "generated" else ("model",)


@dataclass(frozen=True)
class DistillStageConfig:
    loss: str = "fkl"  #: a registered loss (slmkit.train.losses.LOSSES): fkl | rkl | jsd | skl | srkl | tvd | ce
    loss_options: dict = field(default_factory=dict)  #: more fields of the loss config (e.g. beta for jsd, alpha for skl)
    data: str = "generated"  #: "generated" (the gen-data stage's chats) or a text / messages jsonl file
    max_steps: int = 100  #: optimizer steps
    batch_size: int = 4  #: examples per micro-batch
    grad_accum: int = 1  #: micro-batches per step
    learning_rate: float = 5e-5
    block_size: int = 256  #: tokens per example
    temperature: float = 1.0  #: distillation softmax temperature
    ce_weight: float = 0.0  #: weight of the plain cross-entropy term, in [0, 1]
    top_k: int = 0  #: keep only the teacher's top-k tokens (0 = full vocabulary)
    lmbda: float = 0.0  #: on-policy fraction (GKD's lambda)
    save_steps: int = 20  #: checkpoint every N steps (what an interrupted build resumes from)
    options: dict = field(default_factory=dict)  #: any other field of DistillConfig (e.g. warmup_steps, lr_scheduler,
    #: qat, seq_kd, data: {prompt_tokens: 16})

    def __post_init__(self):
        _check_data(self.data)
        self.distill_config(0)

    def distill_config(self, seed: int):
        from slmkit.pipeline.typed import library_config
        from slmkit.train.distill import DistillConfig
        from slmkit.train.losses import loss_config

        shared = {"loss": self.loss, "temperature": self.temperature, "ce_weight": self.ce_weight, "top_k": self.top_k}
        given = {"loss": loss_config(shared, self.loss_options, "loss_options", own="key"),
                 "data": {"block_size": self.block_size}, "lmbda": self.lmbda, "max_steps": self.max_steps,
                 "batch_size": self.batch_size, "grad_accum": self.grad_accum, "learning_rate": self.learning_rate,
                 "save_steps": self.save_steps, "save_total_limit": 1, "logging_steps": min(10, self.max_steps),
                 "seed": seed}
        return library_config(DistillConfig, given, self.options)


@stage("distill", DistillStageConfig, needs=lambda cfg: ("teacher", *_needs_data(cfg)), makes=("model",))
def distill(ctx: Context, cfg: DistillStageConfig) -> StageResult:
    """Heal / train the student on the teacher's token distributions (:func:`slmkit.train.distill.distill`)."""
    from slmkit.train.distill import RUN_FILE, distill as run

    student, tok = ctx.load("model")
    teacher, _ = ctx.teacher()
    out = ctx.work / "model"
    resume = (out / RUN_FILE).is_file()
    if resume:
        log.info("distill: resuming the run in %s", out)
    res = run(student, tok, _data_file(ctx, cfg.data), out, cfg.distill_config(ctx.recipe.seed), teacher=teacher,
              resume=resume, source={"teacher": ctx.recipe.teacher, "student": ctx.slots["model"]},
              callbacks=[_progress_callback(ctx)])
    losses = [h["loss"] for h in res.history]
    return StageResult(outputs={"model": ctx.rel(out)},
                       metrics={"steps": res.steps, "train_loss": res.train_loss, "first_loss": losses[0] if losses else None,
                                "last_loss": losses[-1] if losses else None, "examples": res.examples,
                                "resumed_from": res.resumed_from, "loss": cfg.loss, "history": res.history})


@dataclass(frozen=True)
class SFTStageConfig:
    data: str = "generated"  #: "generated" (the gen-data stage's chats) or a messages jsonl file
    lora: bool | dict = False  #: train a LoRA adapter (merged into the saved model) instead of all weights;
    #: a mapping sets its LoraSettings fields (e.g. {r: 16, alpha: 32})
    max_steps: int = 100
    batch_size: int = 4
    learning_rate: float | None = None  #: default 2e-4 with LoRA, 2e-5 otherwise
    max_length: int = 512  #: tokens per packed row
    save_steps: int = 20  #: checkpoint every N steps
    options: dict = field(default_factory=dict)  #: any other field of SFTConfig (e.g. grad_accum, packing, warmup_steps)

    def __post_init__(self):
        _check_data(self.data)
        self.sft_config(0)

    def sft_config(self, seed: int):
        from slmkit.pipeline.typed import library_config
        from slmkit.train.sft import SFTConfig

        lora = None if self.lora is False else {} if self.lora is True else self.lora  # {}: LoraSettings' defaults
        given = {"lora": lora, "max_steps": self.max_steps, "batch_size": self.batch_size,
                 "learning_rate": self.learning_rate, "max_length": self.max_length, "save_steps": self.save_steps,
                 "logging_steps": min(10, self.max_steps), "seed": seed}
        return library_config(SFTConfig, given, self.options)


@stage("sft", SFTStageConfig, needs=_needs_data, makes=("model",))
def sft(ctx: Context, cfg: SFTStageConfig) -> StageResult:
    """Supervised fine-tuning on chats, loss on assistant tokens only (:func:`slmkit.train.sft.sft`)."""
    from slmkit.artefact import Manifest
    from slmkit.data import read_jsonl
    from slmkit.train.sft import finish_checkpoints, save_trained
    from slmkit.train.sft import sft as run

    model, tok = ctx.load("model")
    chats = [r["messages"] for r in read_jsonl(_data_file(ctx, cfg.data), required=("messages",))]
    ckpts = ctx.work / "checkpoints"
    scfg = cfg.sft_config(ctx.recipe.seed)
    res = run(model, tok, chats, scfg, ckpts, resume=ckpts.is_dir(), callbacks=[_progress_callback(ctx)])
    manifest = Manifest(source=ctx.slots["model"])
    manifest.add_stage("sft", scfg, examples=len(chats))
    dest = save_trained(res.model, tok, ctx.work / "model", manifest, merge=scfg.lora is not None)
    finish_checkpoints(ckpts)
    return StageResult(outputs={"model": ctx.rel(dest)}, metrics={"examples": len(chats), "steps": res.steps,
                                                                  "train_loss": res.train_loss, "lora": scfg.lora is not None})

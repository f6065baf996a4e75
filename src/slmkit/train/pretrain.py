"""Pretraining a student from scratch on a text corpus, on the transformers ``Trainer``.

The architecture is a :class:`~slmkit.models.student.StudentConfig`: a llama model in
MobileLLM's deep-and-thin shape (Liu et al. 2024, arXiv:2402.14905: depth over width, tied
embeddings, GQA, SwiGLU, optionally immediate block-wise weight sharing), freshly initialised
from ``seed`` over a given tokenizer's vocabulary. Data streams from disk
(:class:`~slmkit.train.stream.PackedTextStream`: tokenised on the fly, packed into fixed-length
blocks), so the corpus is never held in memory. The loss is next-token cross-entropy on every
token (the model's own ``labels`` loss).

As for distillation and fine-tuning, the Trainer does the loop, checkpoints, resuming (the
stream is deterministic, and a resumed Trainer skips the batches already trained on),
mixed precision (bf16 autocast over fp32 weights on a GPU) and accelerate (DDP, FSDP,
DeepSpeed under ``accelerate launch``). Around it, :func:`pretrain` keeps the run's identity
in ``OUTPUT.checkpoints/run.json`` (a resume into another run's checkpoints is refused), and the
main process alone writes the final model atomically with its manifest, then removes the
checkpoints. Every block is stored in the artefact (:func:`~slmkit.models.student.untied_state_dict`),
so plain ``AutoModelForCausalLM.from_pretrained`` loads it; slmkit's loader re-ties shared blocks.
The tokenizer is saved without a chat template: the model is a base model that continues text
(``slmkit generate DIR PROMPT`` runs raw); give it one before ``slmkit sft``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from slmkit.artefact import MANIFEST, Manifest, atomic_dir
from slmkit.errors import ConfigError
from slmkit.models.student import StudentConfig, describe_sharing, make_student, untied_state_dict
from slmkit.train.args import TrainerSettings
from slmkit.train.checkpoints import finish_run, mean_logged_loss, prepare_run, settings_identity, stop_at, train_from
from slmkit.train.dist import on_main
from slmkit.train.sft import check_training_output, checkpoint_dir, quiet
from slmkit.train.stream import PackedTextStream, check_corpus, corpus_files, corpus_fingerprint

log = logging.getLogger(__name__)


def _schedulers() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


@dataclass(frozen=True)
class PretrainConfig(TrainerSettings):
    """Knobs of :func:`pretrain` (defaults: MobileLLM's recipe, Liu et al. 2024: AdamW at lr 2e-3,
    cosine decay, weight decay 0.1; their 2048-token context is shortened to 512). The Trainer's settings
    are :class:`TrainerSettings`' fields; the defaults that differ from a fine-tuning run's are set here."""

    max_steps: int = 1000  #: optimizer steps
    batch_size: int = 8  #: blocks per device per micro-batch
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.1
    save_steps: int = 200  #: checkpoint every N steps (0: only the final model)
    student: StudentConfig = field(default_factory=StudentConfig)  #: the architecture (default MobileLLM-125M)
    block_size: int = 512  #: tokens per training sequence (<= student.max_positions)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 4 <= self.block_size <= self.student.max_positions:
            raise ConfigError(f"block_size must be in [4, max_positions={self.student.max_positions}], got {self.block_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.save_steps < 0:
            raise ConfigError("weight_decay, warmup_steps and save_steps must be >= 0")
        if self.lr_scheduler not in _schedulers():
            raise ConfigError(f"unknown lr_scheduler {self.lr_scheduler!r}", f"use one of {', '.join(_schedulers())}")

    def identity(self) -> dict:
        """What must match for a resume to continue this run (not the step budget or save/log cadence)."""
        return settings_identity(self)


@dataclass
class PretrainResult:
    output: str
    steps: int
    train_loss: float  #: mean training loss over all steps of the run (resumed or not)
    history: list[dict]  #: the Trainer's log entries with a loss (step, loss, learning rate, grad norm)
    seconds: float
    tokens: int  #: training tokens seen (steps x global batch x block_size)
    parameters: int  #: unique parameters (shared blocks and the tied head counted once)
    resumed_from: str | None = None
    heldout: dict = field(default_factory=dict)  #: perplexity of ``eval_text`` before and after training

    @property
    def first_loss(self) -> float:
        return self.history[0]["loss"] if self.history else math.nan

    @property
    def last_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


class PretrainTrainer(Trainer):
    """``Trainer`` whose checkpoints store every block apart (transformers refuses to save weights
    shared between blocks; :func:`~slmkit.models.student.untied_state_dict`)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is None:
            state_dict = untied_state_dict(self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict)


class _LogCallback(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        log.info("step %d: %s", state.global_step, logs)


def heldout_perplexity(model, tokenizer, text: str, block_size: int, max_tokens: int) -> dict:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens; 0 = all) in windows of ``block_size``."""
    from slmkit.eval.perplexity import PerplexityConfig, perplexity

    was = model.training
    model.eval()
    res = perplexity(model, tokenizer, text, PerplexityConfig(context=block_size, stride=block_size,
                                                              max_tokens=max_tokens or None))
    model.train(was)
    return {"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens}


def pretrain(
    tokenizer,
    data: Sequence[str | Path],
    output: str | Path,
    cfg: PretrainConfig = PretrainConfig(),
    *,
    tokenizer_spec: str = "",
    device: str = "cpu",
    eval_text: str | None = None,
    eval_tokens: int = 0,
    resume: bool = False,
    force: bool = False,
    callbacks: list | None = None,
    stop_after: int | None = None,
) -> PretrainResult:
    """Train a fresh ``cfg.student`` over ``tokenizer``'s vocabulary on the corpus ``data``; write it to ``output``.

    ``data``: text / jsonl files or directories (:func:`slmkit.train.stream.corpus_files`).
    ``tokenizer_spec`` names the tokenizer in the run identity and the manifest. ``device``: where
    the model is built (``cpu`` or a CUDA device; under ``accelerate launch`` each process's own).
    ``eval_text``: held-out text whose perplexity (first ``eval_tokens`` tokens, 0 = all) is measured
    before and after training. ``resume``: continue the run in ``OUTPUT.checkpoints``; without it a
    run already there is refused. ``stop_after``: stop after that many steps, leaving only
    checkpoints (a resumable partial run). ``force``: replace an ``output`` slmkit did not write.
    """
    output = Path(output)
    t0 = time.perf_counter()
    if eval_tokens < 0 or eval_tokens == 1:
        raise ConfigError(f"eval_tokens (--eval-tokens) must be 0 (all) or >= 2, got {eval_tokens}")
    files = corpus_files(data)
    check_corpus(files, tokenizer, cfg.block_size)
    check_training_output(output, force)
    ckpts = checkpoint_dir(output)
    identity = json.loads(json.dumps({"kind": "pretrain", "tokenizer": tokenizer_spec, "vocab": len(tokenizer),
                                      "data": corpus_fingerprint(files), "config": cfg.identity()}))
    model = make_student(cfg.student, tokenizer, seed=cfg.seed).to(device)
    args = TrainingArguments(**cfg.arguments(ckpts, model), remove_unused_columns=False, dataloader_pin_memory=False)
    _ = args.device  # under `accelerate launch`: sets up the process group (slmkit.train.dist)
    start = on_main(lambda: prepare_run(ckpts, identity, resume, existing="refuse"))  # the main process writes run.json
    measure = (lambda: on_main(lambda: heldout_perplexity(model, tokenizer, eval_text, cfg.block_size, eval_tokens))
               ) if eval_text else None
    heldout = {"before": measure()} if measure and start is None else {}
    cbs = list(callbacks or []) + ([stop_at(stop_after)] if stop_after else [])
    trainer = PretrainTrainer(model=model, args=args, train_dataset=PackedTextStream(files, tokenizer, cfg.block_size),
                              data_collator=default_data_collator, processing_class=tokenizer, callbacks=cbs)
    quiet(trainer)
    trainer.add_callback(_LogCallback())
    model.train()
    train_from(trainer, start)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    steps = int(trainer.state.global_step)
    result = PretrainResult(
        str(output), steps, mean_logged_loss(trainer.state.log_history),
        [h for h in trainer.state.log_history if "loss" in h], time.perf_counter() - t0,
        steps * cfg.batch_size * cfg.grad_accum * args.world_size * cfg.block_size,
        describe_sharing(model)["unique_parameters"], str(start) if start else None, heldout)
    if stop_after and steps < cfg.max_steps:
        return result  # partial run: checkpoints only
    if measure:
        heldout["after"] = measure()
    on_main(lambda: _finalize(model, tokenizer, output, identity, cfg, result, force))
    on_main(lambda: finish_run(ckpts))
    return result


def _finalize(model, tokenizer, output: Path, identity: dict, cfg: PretrainConfig, result: PretrainResult,
              force: bool) -> None:
    """Write the model atomically (config, every block's weights, tokenizer without a chat template, manifest)."""
    manifest = Manifest(source=f"slmkit pretrain ({identity['tokenizer'] or 'tokenizer'})")
    manifest.add_stage("pretrain", cfg, tokenizer=identity["tokenizer"], data=[d["path"] for d in identity["data"]],
                       steps=result.steps, tokens=result.tokens, sharing=describe_sharing(model))
    manifest.metrics.update(train_loss=result.train_loss, first_logged_loss=result.first_loss,
                            last_logged_loss=result.last_loss, steps=result.steps, tokens=result.tokens,
                            parameters=result.parameters, seconds=round(result.seconds, 2))
    for when, m in result.heldout.items():
        manifest.metrics[f"heldout_perplexity_{when}"] = m["perplexity"]
    base_tok = copy.deepcopy(tokenizer)
    base_tok.chat_template = None  # a base model continues text: no chat format it never saw (sft adds one)
    with atomic_dir(output, force=force) as tmp:
        model.save_pretrained(tmp, state_dict=untied_state_dict(model), safe_serialization=True)
        base_tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())

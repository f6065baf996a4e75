"""Knowledge distillation on the transformers ``Trainer``.

:class:`DistillTrainer` subclasses ``transformers.Trainer`` and only replaces
``compute_loss``, so checkpointing, resuming (same data order), logging,
gradient accumulation and accelerate (DDP / FSDP / DeepSpeed) are the Trainer's.
The teacher stays in eval mode under ``no_grad``.

Three regimes, as in GKD (Agarwal et al. 2024, Algorithm 1):

* off-policy: the loss is taken on the fixed data (``lmbda = 0``, ``seq_kd = False``);
* on-policy: with probability ``lmbda`` a batch's completions are replaced by the
  student's own samples from the same prompts, and the teacher scores them;
* sequence-level KD (Kim & Rush 2016): completions are the teacher's generations
  (``seq_kd``, per batch), or a whole data set the teacher wrote (``slmkit gen-data``);
  this is also black-box distillation when the teacher is an API returning only text.

:func:`distill` wraps the trainer with what a run needs around it: a run
identity file (a resume into another run's directory is refused), resuming from
the newest *complete* checkpoint only, and the final model written atomically
with a manifest (:func:`slmkit.artefact.save_model`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from slmkit.artefact import MANIFEST, Manifest, atomic_dir, check_output, is_slmkit_dir
from slmkit.train.dist import on_main
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.train.data import Collator, DataConfig, ExampleDataset, load_examples, pad_batch
from slmkit.train.args import TrainerSettings
from slmkit.train.checkpoints import RUN_FILE, file_sha256, is_complete, mean_logged_loss, prepare_run, settings_identity, stop_at, train_from
from slmkit.train.checkpoints import last_complete_checkpoint  # noqa: F401 (re-exported)
from slmkit.train.losses import IGNORE_INDEX, LossConfig, distill_loss

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TEACHER_DATA = "teacher-data.jsonl"  #: a black-box teacher's answers (written by the CLI into the output)


def is_run_output(path: Path) -> bool:
    """True when ``path`` is a distillation output slmkit wrote: a final model or a run in progress."""
    return is_slmkit_dir(path) or any((path / n).exists() for n in (RUN_FILE, CHECKPOINTS, TEACHER_DATA))


@dataclass(frozen=True)
class DistillConfig(TrainerSettings):
    """Knobs of a distillation (or, with ``loss.loss == "ce"``, plain fine-tuning) run; the Trainer's
    (max_steps, batch_size, learning_rate, save_steps, seed, bf16, ...) are :class:`TrainerSettings`' fields."""

    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lmbda: float = 0.0  #: GKD's lambda: probability that a batch uses student-sampled completions (0 = off-policy)
    seq_kd: bool = False  #: otherwise use teacher-generated completions (sequence-level KD)
    max_new_tokens: int = 64  #: length of on-policy / seq-KD samples
    gen_temperature: float = 1.0  #: sampling temperature of on-policy / seq-KD samples
    qat: str = ""  #: quantisation-aware training on a GGUF block type (Q4_0, Q4_K, ...) or llama.cpp file type (Q4_K_M, ...); "" = off

    def __post_init__(self):
        if not 0 <= self.lmbda <= 1:
            raise ConfigError(f"lmbda must be in [0, 1], got {self.lmbda}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.qat:
            from slmkit.compress.qgrid import GGUF_TYPES
            from slmkit.export.gguf_mix import FTYPES

            if self.qat not in GGUF_TYPES and self.qat not in FTYPES:
                raise ConfigError(f"unknown QAT grid {self.qat!r}", f"use a GGUF type ({', '.join(GGUF_TYPES)}) "
                                  f"or a llama.cpp file type ({', '.join(FTYPES)})")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    def identity(self) -> dict:
        """What must match for a resume to continue this run (not the step budget or save cadence)."""
        return settings_identity(self)


@dataclass
class DistillResult:
    output: str
    steps: int
    train_loss: float  #: mean training loss over all steps of the run (resumed or not: from the logged losses)
    history: list[dict]  #: the Trainer's log entries (step, loss, loss parts, learning rate)
    seconds: float
    resumed_from: str | None = None
    data_kind: str = ""
    examples: int = 0


# ------------------------------------------------------------------ tokenizers


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Raise when teacher and student tokenise differently (logit distillation needs one vocabulary)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    only_t = sorted(set(tv) - set(sv))
    moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])
    detail = f"teacher has {len(tv)} tokens, student {len(sv)}"
    if only_t:
        detail += f"; e.g. {only_t[0]!r} only in the teacher's"
    if moved:
        detail += f"; {len(moved)} tokens have different ids (e.g. {moved[0]!r}: {tv[moved[0]]} vs {sv[moved[0]]})"
    raise UnsupportedModelError(
        f"teacher and student tokenizers differ ({detail})",
        "logit distillation compares next-token distributions over one vocabulary: pick a student made from the "
        "teacher (pruned) or with its tokenizer, or distil black-box: slmkit gen-data then --loss ce",
    )


# ------------------------------------------------------------------ trainer


class DistillTrainer(Trainer):
    """``Trainer`` whose loss is a divergence between the student's and a frozen teacher's next-token distributions."""

    def __init__(self, *args, teacher=None, distill_config: DistillConfig = DistillConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.dcfg = distill_config
        self.model_accepts_loss_kwargs = False  # each micro-batch is a token mean; the Trainer averages over accumulation
        self.teacher = None
        if teacher is not None and (self.dcfg.loss.uses_teacher or self.dcfg.seq_kd):
            teacher.eval()
            teacher.requires_grad_(False)
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        elif self.dcfg.loss.uses_teacher or self.dcfg.seq_kd:
            raise ConfigError(f"loss {self.dcfg.loss.loss!r} needs a teacher model")
        self.seen_idx: list[list[int]] = []  #: example ids of each micro-batch, in training order
        self._parts: dict[str, list[float]] = {}

    # --- on-policy / sequence-level samples

    def _coin(self) -> float:
        # a function of (seed, optimizer step, micro-batch within the step) only: a resumed run flips the same coins
        step = self.state.global_step
        self._micro = self._micro + 1 if getattr(self, "_micro_step", None) == step else 0
        self._micro_step = step
        return random.Random(f"{self.dcfg.seed}:{step}:{self._micro}").random()

    @torch.no_grad()
    def _sample(self, generator_model, inputs: dict) -> dict:
        """Replace each example's completion by a sample from ``generator_model`` given its prompt."""
        tok = self.processing_class
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, labels = [], []
        was_training = generator_model.training
        generator_model.eval()
        for row, plen in zip(inputs["input_ids"], inputs["prompt_len"].tolist()):
            prompt = row[: max(int(plen), 1)][None]  # (1, P)
            out = generator_model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=self.dcfg.max_new_tokens,
                do_sample=True, temperature=self.dcfg.gen_temperature, top_k=0, top_p=1.0, pad_token_id=pad,
            )[0]
            p = prompt.shape[1]
            ids.append(out.tolist())
            labels.append([IGNORE_INDEX] * p + out[p:].tolist())
        generator_model.train(was_training)
        batch = pad_batch(ids, labels, pad)
        return {k: v.to(inputs["input_ids"].device) for k, v in batch.items()}

    # --- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        idx = inputs.pop("idx", None)
        if model.training and idx is not None:
            self.seen_idx.append(idx.tolist())
        coin = self._coin()
        if model.training and coin < self.dcfg.lmbda:
            inputs = self._sample(self.accelerator.unwrap_model(model), inputs)  # on-policy (GKD, lambda)
        elif model.training and self.dcfg.seq_kd:
            inputs = self._sample(self.accelerator.unwrap_model(self.teacher), inputs)  # sequence-level KD
        inputs.pop("prompt_len", None)
        labels = inputs.pop("labels")
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        s_logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        t_logits = None
        if self.dcfg.loss.uses_teacher:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        loss, parts = distill_loss(s_logits, t_logits, labels[:, 1:], self.dcfg.loss)
        for k, v in parts.items():
            self._parts.setdefault(k, []).append(v)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for k, vals in self._parts.items():
            if k != "tokens" and vals:
                logs[f"loss_{k}"] = round(sum(vals) / len(vals), 5)
        self._parts = {}
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------ run directory


def _complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its trainer state names its step and its weights and optimizer are whole."""
    return is_complete(ckpt)


def _prepare_run_dir(output: Path, identity: dict, resume: bool, force: bool = False) -> Path | None:
    """Check ``output`` against this run's identity (:func:`slmkit.train.checkpoints.prepare_run`);
    returns the checkpoint to resume from (or None)."""
    check_output(output, force, owned=is_run_output)
    ckpts = output / CHECKPOINTS
    held = (output / RUN_FILE).exists() or (ckpts.is_dir() and any(ckpts.iterdir()))
    if output.is_dir() and (output / MANIFEST).exists() and not held:
        raise ConfigError(f"{output} already holds a model", "choose another --output")
    return prepare_run(output, identity, resume, existing="refuse", checkpoints=ckpts)


class _LogCallback(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        log.info("step %d: %s", state.global_step, logs)


# ------------------------------------------------------------------ entry point


def distill(
    student,
    tokenizer,
    data: str | Path,
    output: str | Path,
    cfg: DistillConfig = DistillConfig(),
    teacher=None,
    resume: bool = False,
    source: dict | None = None,
    callbacks: list | None = None,
    stop_after: int | None = None,
    base_manifest: Manifest | None = None,
    force: bool = False,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` (trained in place) on ``data``; write the model to ``output``.

    ``source`` describes the models (e.g. ``{"teacher": "default", "student": "dir"}``); it is part
    of the run identity checked on ``resume`` and goes into the manifest. ``stop_after`` stops
    the run after that many steps without writing the final model (a resumable partial run).
    ``base_manifest`` (the student artefact's own manifest) keeps the stages that made the student.
    ``output`` is refused if it holds something slmkit did not write, unless ``force``.
    """
    output = Path(output)
    data = Path(data)
    t0 = time.perf_counter()
    examples, kind = load_examples(data, tokenizer, cfg.data)
    identity = {"source": source or {}, "data": str(data.resolve()), "data_sha256": file_sha256(data),
                "config": json.loads(json.dumps(cfg.identity()))}
    args = TrainingArguments(
        **cfg.arguments(output / CHECKPOINTS, student, bf16=cfg.bf16 or next(student.parameters()).dtype == torch.bfloat16),
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    _ = args.device  # under `accelerate launch`: sets up the process group (slmkit.train.dist)
    ckpt = on_main(lambda: _prepare_run_dir(output, identity, resume, force))  # run.json: the main process writes it
    if cfg.qat:
        from slmkit.train.qat import attach_fake_quant, qat_grids

        attach_fake_quant(student, qat_grids(student, cfg.qat))  # LLM-QAT: train through fake-quantised weights
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    cbs = list(callbacks or []) + ([stop_at(stop_after)] if stop_after else [])
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=ExampleDataset(examples), data_collator=Collator(pad),
        processing_class=tokenizer, teacher=teacher, distill_config=cfg, callbacks=cbs,
    )
    trainer.remove_callback(PrinterCallback)  # the Trainer prints log dicts on stdout; log them instead
    trainer.add_callback(_LogCallback())
    student.train()
    train_from(trainer, ckpt)
    student.eval()
    history = [h for h in trainer.state.log_history if "loss" in h]
    result = DistillResult(str(output), trainer.state.global_step, mean_logged_loss(trainer.state.log_history), history,
                           time.perf_counter() - t0, str(ckpt) if ckpt else None, kind, len(examples))
    result.seen_idx = trainer.seen_idx  # type: ignore[attr-defined]
    if stop_after and trainer.state.global_step < cfg.max_steps:
        return result  # partial run: checkpoints only
    final = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.qat:
        from slmkit.train.qat import finish_qat, qat_grids

        # latent weights -> the grids they were trained on; the codes are kept beside the weights
        from slmkit.export.gguf_mix import FTYPES

        codes = finish_qat(final, qat_grids(final, cfg.qat))
        codes.gguf = cfg.qat if cfg.qat in FTYPES else None
    on_main(lambda: _finalize(final, tokenizer, output, identity, cfg, result, base_manifest, force, codes if cfg.qat else None))
    return result


def _finalize(model, tokenizer, output: Path, identity: dict, cfg: DistillConfig, result: DistillResult,
              base: Manifest | None, force: bool = False, codes=None) -> None:
    """Write the final model atomically (model, tokenizer, manifest), keeping the run's checkpoints inside it.

    ``codes`` (QAT's :class:`~slmkit.compress.quantize.Quantized`): also written packed
    (:data:`slmkit.compress.qstore.PACKED`), so that ``slmkit export DIR --type ...`` writes exactly the
    codes training ended on (a k-quant scale search run again on the rounded weights may pick others)."""
    src = identity.get("source", {})
    manifest = Manifest(source=base.source if base else str(src.get("student", "")),
                        stages=list(base.stages) if base else [])
    manifest.add_stage("distill", cfg, teacher=src.get("teacher"), data=identity["data"], data_kind=result.data_kind,
                       examples=result.examples, steps=result.steps)
    manifest.metrics.update(train_loss=result.train_loss, steps=result.steps, seconds=round(result.seconds, 2))
    with atomic_dir(output, force=force, owned=is_run_output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if codes is not None:
            from slmkit.compress.qstore import PACKED, write_packed

            write_packed(model, codes, tmp / PACKED)
        (tmp / MANIFEST).write_text(manifest.to_json())
        # the run state (run.json, checkpoints, teacher data) comes along as hard links: it stays whole in
        # `output` until the rename, so a run killed here still resumes (moving it in left it torn)
        for entry in sorted(output.iterdir()):
            if not (tmp / entry.name).exists() and not entry.is_symlink():
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


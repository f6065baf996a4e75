"""The transformers ``TrainingArguments`` every slmkit trainer shares (distill, sft, dpo, pretrain).

One place for what all of them want alike: checkpoints every ``save_steps`` (kept for
``--resume``), a logging interval that divides the save interval and the step budget (so a
resumed run logs what an uninterrupted one does, :func:`slmkit.train.checkpoints.logging_steps`),
seeds for the model and the data order, no reporting integrations or tqdm (slmkit draws its own
progress), no dataloader workers, and training on the device the model was put on: the CPU, or
the first visible GPU (each process's own under ``accelerate launch``).

:class:`TrainerSettings` holds the Trainer settings the distill and pretrain configs share: both
subclass it, so the settings are declared once and keep their names (recipe keys, CLI flags, manifests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmkit.train.checkpoints import logging_steps


def trainer_arguments(output_dir: str | Path, model, *, max_steps: int, batch_size: int, grad_accum: int,
                      learning_rate: float, save_steps: int, logging: int, seed: int, lr_scheduler: str = "linear",
                      warmup_steps: int = 0, weight_decay: float = 0.0, save_total_limit: int = 2,
                      bf16: bool = False) -> dict:
    """Keyword arguments for ``TrainingArguments`` (or a TRL config built on it).

    ``save_steps`` 0 saves no checkpoint before the end; ``bf16``: the Trainer's mixed precision
    (bf16 autocast over the weights' own dtype); ``model`` tells where training runs.
    """
    saves = save_steps or max_steps
    return dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        save_strategy="steps" if save_steps else "no",
        save_steps=saves,
        save_total_limit=save_total_limit,
        logging_steps=logging_steps(logging, saves, max_steps),  # a resumed run logs the same
        seed=seed,
        data_seed=seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=next(model.parameters()).device.type == "cpu",  # train where the model was put (CPU or GPU)
        bf16=bf16,
    )


@dataclass(frozen=True)
class TrainerSettings:
    """Trainer settings shared by :class:`~slmkit.train.distill.DistillConfig` and
    :class:`~slmkit.train.pretrain.PretrainConfig` (each subclass checks them in its ``__post_init__``).

    Defaults: a short fine-tuning run (distillation's); PretrainConfig sets MobileLLM's."""

    max_steps: int = 100  #: optimizer steps
    batch_size: int = 4  #: examples (pretrain: blocks) per device per micro-batch
    grad_accum: int = 1  #: micro-batches per optimizer step
    learning_rate: float = 5e-5
    lr_scheduler: str = "constant"  #: any transformers scheduler name (constant, linear, cosine, ...)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 50  #: checkpoint every N steps (and at the end; pretrain: 0 = only the final model)
    save_total_limit: int = 2  #: keep the newest N checkpoints
    logging_steps: int = 10
    seed: int = 0  #: model init / sampling / data order
    bf16: bool = False  #: mixed precision: bf16 autocast over fp32 weights (the Trainer's bf16; bf16 CPUs, GPUs)

    def arguments(self, output_dir: str | Path, model, bf16: bool | None = None) -> dict:
        """:func:`trainer_arguments` of these settings; ``bf16`` (when given) instead of the field."""
        return trainer_arguments(output_dir, model, max_steps=self.max_steps, batch_size=self.batch_size,
                                 grad_accum=self.grad_accum, learning_rate=self.learning_rate,
                                 save_steps=self.save_steps, logging=self.logging_steps, seed=self.seed,
                                 lr_scheduler=self.lr_scheduler, warmup_steps=self.warmup_steps,
                                 weight_decay=self.weight_decay, save_total_limit=self.save_total_limit,
                                 bf16=self.bf16 if bf16 is None else bf16)

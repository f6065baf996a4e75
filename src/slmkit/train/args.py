"""The transformers ``TrainingArguments`` every slmkit trainer shares (distill, sft, dpo, pretrain).

One place for what all of them want alike: checkpoints every ``save_steps`` (kept for
``--resume``), a logging interval that divides the save interval and the step budget (so a
resumed run logs what an uninterrupted one does, :func:`slmkit.train.checkpoints.logging_steps`),
seeds for the model and the data order, no reporting integrations or tqdm (slmkit draws its own
progress), no dataloader workers, and training on the device the model was put on: the CPU, or
the first visible GPU (each process's own under ``accelerate launch``).
"""

from __future__ import annotations

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

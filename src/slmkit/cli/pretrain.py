"""Pretraining verb: ``slmkit pretrain`` (a fresh student from :mod:`slmkit.models.student` on a text corpus)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import (DEVICE_HELP, FORCE_HELP, PRECISION_HELP, RegistryHelpCommand, console, kv_table,
                                mixed_precision, print_json, registry_names)
from slmkit.cli.progress import quiet_libraries, with_progress

#: --flag -> StudentConfig field
ARCH_FLAGS = {"--layers": "layers", "--hidden": "hidden", "--heads": "heads", "--kv-heads": "kv_heads",
              "--intermediate": "intermediate", "--share-blocks": "share"}


def register(app: typer.Typer) -> None:
    app.command("pretrain", cls=RegistryHelpCommand)(with_progress("pretrain")(pretrain_cmd))


def student_from_flags(preset: str, block_size: int, **sizes: Optional[int]):
    """``--preset`` with the size flags given on top; a bad shape is a ConfigError naming the flags."""
    import dataclasses

    from slmkit.errors import ConfigError
    from slmkit.models.student import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset}: unknown", f"use one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    given = {field: v for field, v in sizes.items() if v is not None}
    try:
        return dataclasses.replace(base, max_positions=max(base.max_positions, block_size), **given)
    except ConfigError as err:
        shape = ", ".join(f"{flag} {getattr(base, f) if f not in given else given[f]}" for flag, f in ARCH_FLAGS.items())
        raise ConfigError(f"student shape: {err.problem}",
                          f"adjust {', '.join(ARCH_FLAGS)} (now {shape}; preset {preset})") from None


def pretrain_cmd(
    data: list[Path] = typer.Option(..., "--data", help="corpus: text files, jsonl of {\"text\"} rows, or directories "
                                    "of them (repeat the flag); streamed, never loaded whole"),
    output: Path = typer.Option(..., "--output", help="directory to write the model to (checkpoints: OUTPUT.checkpoints)"),
    tokenizer: str = typer.Option("default", "--tokenizer", help="the tokenizer of this model spec: default | hub id | dir | file.gguf"),
    preset: str = typer.Option("mobilellm-125m", "--preset", help="student shape: " + registry_names("slmkit.models.student", "PRESETS") + " (the size flags below override it)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="transformer blocks run (depth)"),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="model width"),
    heads: Optional[int] = typer.Option(None, "--heads", help="query heads (must divide --hidden)"),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="key/value heads (GQA; must divide --heads)"),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="SwiGLU inner size (0: 8/3 x hidden)"),
    share_blocks: Optional[int] = typer.Option(None, "--share-blocks", help="adjacent blocks sharing weights "
                                               "(1: none, 2: MobileLLM-LS; must divide --layers)"),
    block_size: int = typer.Option(512, "--block-size", help="tokens per training sequence"),
    max_steps: int = typer.Option(1000, "--max-steps", min=1, help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="sequences per device per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(2e-3, "--lr", help="peak learning rate"),
    lr_scheduler: str = typer.Option("cosine", "--lr-scheduler", help="constant | linear | cosine | ... (transformers)"),
    warmup_steps: int = typer.Option(0, "--warmup-steps", min=0),
    weight_decay: float = typer.Option(0.1, "--weight-decay", min=0.0),
    save_steps: int = typer.Option(200, "--save-steps", min=0, help="checkpoint every N steps (0: none)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in OUTPUT.checkpoints from its last complete checkpoint"),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="held-out text: perplexity before and after training"),
    eval_tokens: int = typer.Option(0, "--eval-tokens", min=0, help="score only the first N tokens of --eval-data (0: all)"),
    seed: int = typer.Option(0, "--seed"),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (a GPU other than the first: CUDA_VISIBLE_DEVICES)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Pretrain a fresh MobileLLM-style student (deep and thin, optionally sharing blocks) on a text corpus."""
    from slmkit.errors import ConfigError, SlmkitError
    from slmkit.eval.perplexity import read_text
    from slmkit.models import load_tokenizer
    from slmkit.models.device import resolve_device, training_device_check
    from slmkit.progress import trainer_callback
    from slmkit.train.pretrain import PretrainConfig, pretrain

    dev = resolve_device(device)
    training_device_check(dev)
    bf16 = mixed_precision(precision, dev)
    student = student_from_flags(preset, block_size, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                 intermediate=intermediate, share=share_blocks)
    cfg = PretrainConfig(student=student, block_size=block_size, max_steps=max_steps, batch_size=batch_size,
                         grad_accum=grad_accum, learning_rate=lr, lr_scheduler=lr_scheduler, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, save_steps=min(save_steps, max_steps), seed=seed, bf16=bf16,
                         logging_steps=max(1, min(10, max_steps // 5)))
    eval_text = read_text(eval_data) if eval_data is not None else None
    quiet_libraries()
    try:
        tok = load_tokenizer(tokenizer)
    except SlmkitError as err:
        raise type(err)(f"--tokenizer {tokenizer}: {err.problem}", err.hint) from None
    res = pretrain(tok, data, output, cfg, tokenizer_spec=tokenizer, device=str(dev), eval_text=eval_text,
                   eval_tokens=eval_tokens, resume=resume, force=force, callbacks=[trainer_callback()])
    out = {"output": str(output), "tokenizer": tokenizer, "parameters": res.parameters, "steps": res.steps,
           "tokens": res.tokens, "train_loss": res.train_loss, "first_logged_loss": res.first_loss,
           "last_logged_loss": res.last_loss, "seconds": round(res.seconds, 2), "resumed_from": res.resumed_from,
           "device": str(dev), "bf16": bf16}
    out.update({f"heldout_perplexity_{k}": v["perplexity"] for k, v in res.heldout.items()})
    if json_out:
        print_json(out)
        return
    console.print(kv_table(f"pretrain -> {output}", [(k, f"{v:.4f}" if isinstance(v, float) else v)
                                                     for k, v in out.items() if v is not None]))

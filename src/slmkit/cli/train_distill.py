"""Distillation verbs: distill, gen-data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import (DEVICE_HELP, DTYPE_HELP, FORCE_HELP, RegistryHelpCommand, console, err_console,
                                kv_table, parse_options, print_json, registry_names)
from slmkit.cli.progress import with_progress

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("distill", cls=RegistryHelpCommand)(with_progress("distill")(distill_cmd))
    app.command("gen-data")(with_progress("gen-data")(gen_data_cmd))


def distill_cmd(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="default | hub id | dir | file.gguf | http(s) endpoint (black-box: sequence-level KD)"),
    student: str = typer.Option(..., "--student", help="the model to train: default | hub id | dir | file.gguf"),
    data: Path = typer.Option(..., "--data", help="plain-text file (language modelling) or messages jsonl (chat)"),
    loss: str = typer.Option("fkl", "--loss", help=registry_names("slmkit.train.losses", "LOSSES") + " (ce = plain fine-tuning)"),
    output: Path = typer.Option(..., "--output", help="directory for checkpoints and the final model"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="optimizer steps"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its last complete checkpoint"),
    temperature: float = typer.Option(1.0, "--temperature", help="distillation softmax temperature"),
    beta: float = typer.Option(0.5, "--beta", help="JSD beta in (0, 1)"),
    alpha: float = typer.Option(0.1, "--alpha", help="skew KL alpha in (0, 1)"),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="mix in cross-entropy on the data: (1-w) div + w ce"),
    top_k: int = typer.Option(0, "--top-k", help="keep only the teacher's top-k tokens (0 = all)"),
    loss_option: list[str] = typer.Option([], "--loss-option", help="KEY=VALUE: another field of the loss config (a new loss's own knob; repeatable, YAML values)"),
    lmbda: float = typer.Option(0.0, "--lmbda", help="on-policy fraction: batches whose completions the student samples"),
    seq_kd: bool = typer.Option(False, "--seq-kd", help="train on teacher-generated completions"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="length of on-policy / seq-KD / black-box samples"),
    gen_temperature: float = typer.Option(1.0, "--gen-temperature", help="sampling temperature of on-policy / seq-KD / black-box samples (0 = greedy)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(5e-5, "--lr", help="learning rate"),
    block_size: int = typer.Option(128, "--block-size", help="tokens per example"),
    max_examples: int = typer.Option(0, "--max-examples", help="use the first N examples of --data (0 = all)"),
    save_steps: int = typer.Option(50, "--save-steps", min=1),
    seed: int = typer.Option(0, "--seed"),
    qat: Optional[str] = typer.Option(None, "--qat", help="quantisation-aware training on a GGUF block type (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) or a llama.cpp file type (Q4_K_M, Q5_K_M, ...: each Linear on the type llama-quantize gives it)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP + "; both models"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (both models; a GPU other than the first: "
                               "CUDA_VISIBLE_DEVICES)"),
    autocast_bf16: bool = typer.Option(False, "--autocast-bf16", help="mixed precision: fp32 weights, bf16 autocast compute (the Trainer's bf16)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Distil TEACHER into STUDENT on DATA (or fine-tune with --loss ce); write the model to OUTPUT."""
    from slmkit.artefact import Manifest, check_output
    from slmkit.backends import from_spec, is_endpoint
    from slmkit.errors import ConfigError, DataError
    from slmkit.models import load
    from slmkit.models.device import resolve_device, resolve_dtype, training_device_check
    from slmkit.progress import trainer_callback
    from slmkit.train.data import DataConfig
    from slmkit.train.distill import TEACHER_DATA, DistillConfig, check_same_tokenizer, distill, is_run_output
    from slmkit.train.losses import LossConfig, loss_config

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    training_device_check(dev)
    dtype = resolve_dtype(dtype, dev)
    lcfg = loss_config({"loss": loss, "temperature": temperature, "beta": beta, "alpha": alpha, "ce_weight": ce_weight,
                        "top_k": top_k}, parse_options(loss_option, "--loss-option"), "--loss-option", own="flag")
    check_output(output, force, owned=is_run_output)
    data_path = data
    black_box = teacher is not None and is_endpoint(teacher)
    if black_box:
        # a text-only API: sequence-level KD on its answers to the data's prompts
        from slmkit.data.synth import SynthConfig, generate_dataset, read_prompts

        if lcfg.loss != "ce" or lmbda > 0 or seq_kd:
            err_console.print(f"[yellow]teacher {teacher} returns only text: using sequence-level KD (--loss ce on its answers)[/]")
        lcfg = LossConfig(loss="ce")
        lmbda, seq_kd = 0.0, False
        output.mkdir(parents=True, exist_ok=True)
        data_path = output / TEACHER_DATA
        rep = generate_dataset(from_spec(teacher), read_prompts(data, limit=max_examples), data_path,
                               SynthConfig(max_new_tokens=max_new_tokens, temperature=gen_temperature, seed=seed,
                                           min_words=1, near_dup=1.0), force=force)
        if rep.accepted == 0:
            raise DataError(f"teacher {teacher} gave no usable answer to the prompts in {data} (rejected: {rep.rejected})")
        if rep.failed:
            err_console.print(f"[yellow]teacher {teacher} gave no answer to {rep.failed} prompt(s) (first: {rep.failures[0]}); "
                              f"training on the {rep.accepted} answered[/]", markup=True, highlight=False)
    elif teacher is None and lcfg.uses_teacher:
        raise ConfigError(f"--loss {loss} needs --teacher", "pass --teacher MODEL, or --loss ce for plain fine-tuning")
    cfg = DistillConfig(
        loss=lcfg, data=DataConfig(block_size=block_size, max_examples=max_examples), lmbda=lmbda, seq_kd=seq_kd,
        max_new_tokens=max_new_tokens, gen_temperature=max(gen_temperature, 1e-3), max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        learning_rate=lr, save_steps=min(save_steps, max_steps), seed=seed, logging_steps=max(1, min(10, max_steps // 5)), qat=qat or "",
        bf16=autocast_bf16,
    )
    s_model, s_tok = load(student, dtype=dtype, device=dev)
    t_model = None
    if teacher is not None and not black_box and (lcfg.uses_teacher or seq_kd):
        t_model, t_tok = load(teacher, dtype=dtype, device=dev)
        check_same_tokenizer(t_tok, s_tok)
    base = Manifest.read(student) if Path(student).is_dir() else None
    res = distill(s_model, s_tok, data_path, output, cfg, teacher=t_model, resume=resume,
                  source={"teacher": teacher, "student": student, "black_box": black_box}, base_manifest=base,
                  force=force, callbacks=[trainer_callback()])
    first = res.history[0]["loss"] if res.history else None
    last = res.history[-1]["loss"] if res.history else None
    out = {"output": str(output), "teacher": teacher, "student": student, "loss": lcfg.loss, "steps": res.steps,
           "train_loss": res.train_loss, "first_logged_loss": first, "last_logged_loss": last,
           "seconds": round(res.seconds, 2), "resumed_from": res.resumed_from, "data_kind": res.data_kind,
           "examples": res.examples, "black_box": black_box}
    if json_out:
        print_json(out)
        return
    console.print(kv_table(f"distill -> {output}", [(k, v) for k, v in out.items() if v is not None]))


def gen_data_cmd(
    model: str = typer.Argument(..., help="teacher: default | hub id | dir | file.gguf | http(s) endpoint (URL#model)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="jsonl (messages/prompt/instruction/turns/question) or text, one per line"),
    output: Path = typer.Option(..., "--output", help="messages jsonl to append to (resumable)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    n: int = typer.Option(0, "--n", min=0, help="accepted examples to produce at most (0 = one per prompt)"),
    self_instruct: int = typer.Option(0, "--self-instruct", min=0, help="also let the teacher write N new prompts from --prompts as seeds"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    min_words: int = typer.Option(3, "--min-words"),
    max_words: int = typer.Option(2000, "--max-words"),
    near_dup: float = typer.Option(0.8, "--near-dup", help="3-gram Jaccard threshold for near duplicates (1 = exact only)"),
    max_perplexity: float = typer.Option(0.0, "--max-perplexity", help="drop replies above this teacher perplexity (0 = off)"),
    judge: Optional[str] = typer.Option(None, "--judge", help="judge model or endpoint for --min-judge-score"),
    min_judge_score: float = typer.Option(0.0, "--min-judge-score", help="drop replies the judge scores below this (1-10)"),
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="prompts per teacher call (replies do not depend on it; "
                                   "0 = max(8, 4 x --concurrency))"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="requests in flight at once to an http(s) teacher "
                                    "(vLLM, slmkit serve); rows are the same at any value"),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON list of OpenAI function specs: the teacher calls one per prompt "
                                         "(constrained decoding), rows are tool-use conversations for sft"),
    tool_choice: str = typer.Option("required", "--tool-choice", help="with --tools: required (any function) or a function name"),
    parallel_calls: bool = typer.Option(False, "--parallel-calls", help="with --tools: allow several calls per reply"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (a local teacher)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Write teacher answers to prompts as messages jsonl, filtered (length, duplicates, perplexity, judge);
    with --tools, tool-use conversations whose calls are valid by construction."""
    from slmkit.backends import check_concurrency, from_spec
    from slmkit.data.synth import SynthConfig, check_synth_output, generate_dataset, read_prompts, self_instruct_prompts
    from slmkit.errors import ConfigError
    from slmkit.models.device import resolve_device, resolve_dtype

    check_concurrency(concurrency, model, judge)
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    batch_size = batch_size or max(8, 4 * concurrency)
    if prompts is None:
        raise ConfigError("gen-data needs --prompts FILE", "e.g. --prompts ../shared/data/instructions/self_instruct_seed_tasks.jsonl")
    if min_judge_score > 0 and judge is None:
        raise ConfigError("--min-judge-score needs --judge MODEL")
    if tools is not None:
        return _gen_tool_data(model, prompts, output, force, tools, tool_choice, parallel_calls, n, self_instruct,
                              max_new_tokens, temperature, seed, batch_size, dtype, dev, json_out,
                              text_filters=judge is not None or max_perplexity > 0)
    if tool_choice != "required" or parallel_calls:
        raise ConfigError("--tool-choice and --parallel-calls need --tools FILE")
    cfg = SynthConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, min_words=min_words,
                      max_words=max_words, near_dup=near_dup, max_perplexity=max_perplexity, min_judge_score=min_judge_score,
                      batch_size=batch_size)
    items = read_prompts(prompts)
    check_synth_output(output, force)
    teacher = from_spec(model, dtype=dtype, concurrency=concurrency, device=dev)
    if self_instruct:
        items = items + self_instruct_prompts(teacher, items, self_instruct, seed=seed)
    judge_b = from_spec(judge, dtype=dtype, concurrency=concurrency, device=dev) if judge else None
    _print_synth(model, generate_dataset(teacher, items, output, cfg, judge=judge_b, force=force), json_out)


def _print_synth(model: str, rep, json_out: bool) -> None:
    """Print the report; if some prompts got no answer, then fail (exit 2) saying a rerun retries them."""
    from slmkit.errors import BackendError

    if json_out:
        print_json(rep)
    else:
        rows = [("output", rep.output), ("rows in output", rep.accepted), ("generated now", rep.generated),
                ("already done", rep.skipped_done), ("rejected now", ", ".join(f"{k} {v}" for k, v in rep.rejected.items()) or "0")]
        if rep.failed:
            rows.append(("failed (no answer)", rep.failed))
        console.print(kv_table(f"gen-data {model}", rows))
    if rep.failed:
        raise BackendError(f"the teacher gave no answer to {rep.failed} prompt(s) (first: {rep.failures[0]})",
                           "the answered rows are written; rerun the same command to retry only the failed prompts")


def _gen_tool_data(model: str, prompts: Path, output: Path, force: bool, tools: Path, tool_choice: str, parallel: bool,
                   n: int, self_instruct: int, max_new_tokens: int, temperature: float, seed: int, batch_size: int,
                   dtype: str, device, json_out: bool, text_filters: bool) -> None:
    """gen-data --tools: a constrained call per prompt (:func:`slmkit.data.toolsynth.generate_tool_dataset`)."""
    from slmkit.backends import from_spec, is_endpoint
    from slmkit.data.synth import check_synth_output, read_prompts, self_instruct_prompts
    from slmkit.data.toolsynth import ToolSynthConfig, check_choice, generate_tool_dataset, read_tools
    from slmkit.errors import ConfigError

    if text_filters:
        raise ConfigError("--judge and --max-perplexity filter text answers; they do not apply with --tools")
    if is_endpoint(model):
        raise ConfigError("gen-data --tools needs a local teacher (constrained decoding runs in slmkit), not an endpoint",
                          "pass a model directory, hub id, file.gguf or 'default'")
    offered = read_tools(tools)
    cfg = ToolSynthConfig(tool_choice=check_choice(offered, tool_choice), parallel=parallel, n=n,
                          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    items = read_prompts(prompts)
    check_synth_output(output, force)
    teacher = from_spec(model, dtype=dtype, device=device)
    if self_instruct:
        items = items + self_instruct_prompts(teacher, items, self_instruct, seed=seed)
    _print_synth(model, generate_tool_dataset(teacher, items, offered, output, cfg, force=force), json_out)

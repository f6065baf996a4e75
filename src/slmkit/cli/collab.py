"""Collaboration verbs: speculate, route, judge, proxy, invert."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import (DEVICE_HELP, DTYPE_HELP, FORCE_HELP, RegistryHelpCommand, console, kv_table,
                                print_json, registry_names)


def register(app: typer.Typer) -> None:
    app.command("speculate", cls=RegistryHelpCommand)(speculate)
    app.command("route", cls=RegistryHelpCommand)(route)
    app.command("judge", cls=RegistryHelpCommand)(judge)
    app.command("proxy")(proxy)
    app.command("invert")(invert)


def speculate(
    prompt: str = typer.Argument(..., help="the prompt (wrapped in the target's chat template unless --raw)"),
    draft: str = typer.Option(..., "--draft", help="a draft made from the target: " + registry_names("slmkit.collab.drafters", "DRAFT_KINDS") + " (lookup: prompt lookup alone; int4/int8: the target's own quantised copy on the fast path, with prompt lookup when the context repeats; layers:N: its first N blocks), or a draft MODEL (same tokenizer as the target)"),
    target: str = typer.Option(..., "--target", help="target MODEL: default | hub id | directory | file.gguf"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (greedy output identical to the target) or bf16"),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help="wrap PROMPT in the target's chat template (default: when the target has one, as generate does; an instruct model given a raw prompt often stops at once)"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(4, "--k", min=0, help="draft length with --fixed-k"),
    first_k: int = typer.Option(1, "--first-k", min=1, help="adaptive: draft length of the first step, which measures the draft (short, so a poor draft costs little)"),
    k_max: int = typer.Option(12, "--k-max", min=1, max=64, help="longest draft the adaptive rule may choose"),
    fixed: bool = typer.Option(False, "--fixed-k", help="keep k fixed instead of choosing it from measured costs and acceptance"),
    lookup: Optional[bool] = typer.Option(None, "--lookup/--no-lookup", help="also draft by prompt lookup when the context repeats (default: on for int4/int8)"),
    draft_weights: str = typer.Option("int4", "--draft-weights", help="a draft MODEL or layers:N drafts on slmkit's fast path with these weights: int4 | int8 | native, or with transformers' forward: hf (the output never depends on it)"),
    baseline: str = typer.Option("generate", "--baseline", help="the target alone that speedup divides by: generate (transformers' model.generate) | fast (slmkit's fast path, the engine that verifies)"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the target-alone run (speedup is then null)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Speculative decoding: the draft proposes, the target verifies; reports speed-up and acceptance."""
    import torch

    from slmkit.backends.hf import token_id_list
    from slmkit.collab.drafters import DRAFT_WEIGHTS, resolve_draft
    from slmkit.collab.proxy import encode_prompt
    from slmkit.collab.speculative import SpecConfig, autoregressive, hf_generate, speculate as run
    from slmkit.errors import ConfigError
    from slmkit.models import load

    if baseline not in ("generate", "fast"):
        raise ConfigError(f"--baseline must be generate or fast, got {baseline!r}")
    if draft_weights not in DRAFT_WEIGHTS:
        raise ConfigError(f"--draft-weights must be one of {', '.join(DRAFT_WEIGHTS)}, got {draft_weights!r}")
    t_model, t_tok = load(target, dtype=dtype)
    d_model = resolve_draft(draft, t_model, t_tok, dtype, "the draft (--draft)", lookup=lookup)
    eos = {t for t in (t_tok.eos_token_id, *token_id_list(t_model.generation_config.eos_token_id)) if t is not None}
    cfg = SpecConfig(
        max_new_tokens=max_new_tokens, k=min(k, k_max), first_k=min(first_k, k_max), k_max=k_max, adaptive=not fixed,
        temperature=temperature, top_p=top_p, eos_token_ids=tuple(sorted(eos)), draft_weights=draft_weights,
    )
    ids = encode_prompt(t_tok, prompt, chat)

    def target_alone(c):
        if baseline == "generate":
            return hf_generate(t_model, ids, c, seed)
        return autoregressive(t_model, ids, replace(c, fast_target=True), torch.Generator().manual_seed(seed))

    warm = replace(cfg, max_new_tokens=2)  # warm-up: first-call overheads off the clock
    target_alone(warm)
    run(t_model, d_model, ids, warm)
    base = None if no_baseline else target_alone(cfg)
    out = run(t_model, d_model, ids, cfg, torch.Generator().manual_seed(seed))
    body = [t for t in out.tokens if t not in eos]
    result = {
        "text": t_tok.decode(body, skip_special_tokens=True),
        "tokens": len(out.tokens),
        "tokens_per_s": out.tokens_per_s,
        "speedup": None if base is None else out.tokens_per_s / base.tokens_per_s,
        "acceptance_rate": out.acceptance_rate,
        "target_tokens_per_s": None if base is None else base.tokens_per_s,
        "baseline": None if base is None else baseline,
        "drafted": out.drafted,
        "accepted": out.accepted,
        "lookup_drafted": out.lookup_drafted,
        "lookup_accepted": out.lookup_accepted,
        "target_calls": out.target_calls,
        "plain_steps": sum(1 for k_ in out.draft_lengths if k_ == 0),
        "mean_draft_length": (sum(out.draft_lengths) / len(out.draft_lengths)) if out.draft_lengths else 0.0,
        "identical_to_target": None if base is None or temperature > 0 else base.tokens == out.tokens,
        "finish_reason": out.finish_reason,
        "draft": draft,
        "target": target,
        "dtype": dtype,
    }
    if json_out:
        print_json(result)
        return
    sys.stdout.write(result["text"] + "\n")
    rows = [(k_, v) for k_, v in result.items() if k_ != "text"]
    console.print(kv_table("speculative decoding", rows))


def route(
    small: str = typer.Option(..., "--small", help="small MODEL (answers first)"),
    large: str = typer.Option(..., "--large", help="large MODEL or http(s):// OpenAI-compatible URL"),
    data: Path = typer.Option(..., "--data", help="jsonl with 'question' (and 'answer' to measure quality)"),
    escalate: Optional[float] = typer.Option(None, "--escalate", help="target escalation rate in [0, 1]"),
    quality: Optional[float] = typer.Option(None, "--quality", help="instead: target fraction of large-model quality in [0, 1]"),
    signal: str = typer.Option("logprob", "--signal", help="confidence signal: " + registry_names("slmkit.collab.cascade", "SIGNALS") + " (router, and probe without --probe, train on the calibration split)"),
    probe: Optional[Path] = typer.Option(None, "--probe", help="--signal probe: a probe file from `slmkit judge --signal probe --save-probe FILE`"),
    calib_fraction: float = typer.Option(0.5, "--calib-fraction", help="share of labelled rows used to calibrate"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N rows (0 = all)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    samples: int = typer.Option(4, "--samples", min=2, help="samples per question for --signal consistency"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds per request to a large endpoint"),
    retries: int = typer.Option(2, "--retries", min=0, help="retries per request to a large endpoint"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="requests in flight at once to a large endpoint"),
    fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="answer from the small model when the large one is unreachable"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (local models)"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Cascade: the small model answers, low-confidence questions escalate to the large one."""
    from slmkit.backends import check_concurrency
    from slmkit.collab.cascade import CascadeConfig, run_route
    from slmkit.models.device import resolve_device, resolve_dtype

    cfg = CascadeConfig(
        signal=signal, escalate=escalate, quality=quality, calib_fraction=calib_fraction,
        max_new_tokens=max_new_tokens, samples=samples, timeout=timeout, retries=retries, concurrency=concurrency,
        fallback=fallback, seed=seed, probe=None if probe is None else str(probe),
    )
    check_concurrency(concurrency, large)
    dev = resolve_device(device)
    report = run_route(small, large, data, cfg, limit=limit, dtype=resolve_dtype(dtype, dev), device=dev)
    if json_out:
        print_json(report)
        return
    console.print(kv_table("cascade", [(k_, v) for k_, v in report.items() if k_ not in ("curve", "answers")]))


def judge(
    data: Path = typer.Option(..., "--data", help="jsonl with 'question', 'answer' and optional 'label' (1 = hallucinated)"),
    model: str = typer.Option("default", "--model", help="the judging (small) MODEL"),
    signal: str = typer.Option("logprob", "--signal", "--method", help="risk signal: " + registry_names("slmkit.collab.judge", "JUDGES")),
    samples: int = typer.Option(4, "--samples", min=2, help="--signal consistency: sampled answers per question"),
    probe: Optional[Path] = typer.Option(None, "--probe", help="--signal probe: a trained probe file (without it: probes cross-validated on the labelled rows, grouped by question)"),
    save_probe: Optional[Path] = typer.Option(None, "--save-probe", help="--signal probe: write the probe fitted on all rows here (safetensors)"),
    probe_layer: Optional[int] = typer.Option(None, "--probe-layer", help="--signal probe: hidden-state index (0 = embeddings, -1 = last; default: the middle block)"),
    folds: int = typer.Option(5, "--folds", min=2, help="--signal probe: held-out folds"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="flag items whose risk exceeds this"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N rows (TruthfulQA: N questions, 2N pairs)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (a local --model)"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="requests in flight at once when --model is an http(s) endpoint"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Score (question, answer) pairs for hallucination risk (TruthfulQA.csv or jsonl); AUROC when labelled."""
    from slmkit.backends import check_concurrency
    from slmkit.collab.judge import JudgeConfig, judge_file
    from slmkit.models.device import resolve_device, resolve_dtype

    from slmkit.collab.probe import ProbeConfig

    cfg = JudgeConfig(method=signal, samples=samples, threshold=threshold, probe=None if probe is None else str(probe),
                      probe_cfg=ProbeConfig(layer=probe_layer, folds=folds))
    check_concurrency(concurrency, model)
    dev = resolve_device(device)
    report = judge_file(model, data, cfg, limit=limit, dtype=resolve_dtype(dtype, dev), save_probe=save_probe,
                        concurrency=concurrency, device=dev)
    if json_out:
        print_json(report)
        return
    console.print(kv_table("judge", [(k_, v) for k_, v in report.items() if k_ != "items"]))


def proxy(
    prompt: Optional[str] = typer.Argument(None, help="the prompt (wrapped in the chat template unless --raw); omit with --eval"),
    base: str = typer.Option(..., "--base", help="the LARGE model to steer: default | hub id | directory | file.gguf"),
    tuned: str = typer.Option(..., "--tuned", help="the tuned SMALL model (the expert)"),
    untuned: str = typer.Option(..., "--untuned", help="the same SMALL model before tuning; all three share one tokenizer"),
    alpha: float = typer.Option(1.0, "--alpha", help="strength of the (tuned - untuned) shift; 1.0 as in Liu et al. 2024"),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="jsonl of {question | prompt, answer(s), context?}: task metric of base, tuned, untuned and proxy, and the tuning gap closed"),
    reference: Optional[str] = typer.Option(None, "--reference", help="with --eval: the LARGE model tuned directly (the gap proxy-tuning should close)"),
    limit: int = typer.Option(0, "--limit", min=0, help="with --eval: first N rows (0 = all)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="continue PROMPT as raw text (no chat template)"),
    dtype: str = typer.Option("fp32", "--dtype"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Proxy-tuning: decode the large model with the logit shift of a tuned small model (Liu et al. 2024)."""
    import torch

    from slmkit.backends.hf import token_id_list
    from slmkit.collab.proxy import ProxyConfig, decode_system, encode_prompt, evaluate_proxy
    from slmkit.collab.speculative import check_same_tokenizer
    from slmkit.errors import ConfigError
    from slmkit.models import load

    if (prompt is None) == (eval_data is None):
        raise ConfigError("give a PROMPT or --eval FILE (one of them)")
    if reference is not None and eval_data is None:
        raise ConfigError("--reference is compared under --eval FILE")
    rows = None
    if eval_data is not None:
        from slmkit.data import read_jsonl

        rows = read_jsonl(eval_data, limit=limit)
        for i, r in enumerate(rows, 1):
            if not ("question" in r or "prompt" in r) or not isinstance(r.get("answer", r.get("answers")), (str, list)):
                raise ConfigError(f"{eval_data}: row {i} needs 'question' (or 'prompt') and 'answer' (a string or list)")
    large, tok = load(base, dtype=dtype)
    models = {"--tuned": load(tuned, dtype=dtype), "--untuned": load(untuned, dtype=dtype)}
    if reference is not None:
        models["--reference"] = load(reference, dtype=dtype)
    for flag, (_, t) in models.items():
        check_same_tokenizer(tok, t, f"--base and {flag}")
    chat = not raw and bool(getattr(tok, "chat_template", None))
    eos = {t for t in (tok.eos_token_id, *token_id_list(large.generation_config.eos_token_id)) if t is not None}
    cfg = ProxyConfig(alpha=alpha, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_token_ids=tuple(sorted(eos)))
    small_t, small_u = models["--tuned"][0], models["--untuned"][0]
    if rows is not None:
        ref = models["--reference"][0] if reference is not None else None
        result = {"base": base, "tuned": tuned, "untuned": untuned, "reference": reference, "data": str(eval_data),
                  **evaluate_proxy(large, small_t, small_u, tok, rows, cfg, chat=chat, reference=ref)}
        if not json_out:
            result.pop("examples")
    else:
        out = decode_system("proxy", large, small_t, small_u, encode_prompt(tok, prompt, chat), cfg, torch.Generator().manual_seed(seed))
        result = {"text": tok.decode([t for t in out.tokens if t not in eos], skip_special_tokens=True),
                  "tokens": len(out.tokens), "tokens_per_s": out.tokens_per_s, "finish_reason": out.finish_reason,
                  "alpha": alpha, "base": base, "tuned": tuned, "untuned": untuned}
    if json_out:
        print_json(result)
        return
    if "text" in result:
        sys.stdout.write(result["text"] + "\n")
    console.print(kv_table("proxy-tuning", [(k_, v) for k_, v in result.items() if k_ != "text"]))


def invert(
    model: str = typer.Argument(..., help="the inverter's MODEL (with --train: the base to fine-tune): default | hub id | directory | file.gguf"),
    train: Optional[Path] = typer.Option(None, "--train", help='jsonl of {"prompt", "output"} / {"messages"} / Self-Instruct rows to train on'),
    output: Optional[Path] = typer.Option(None, "--output", help="with --train: directory to write (LoRA adapter, or model with --merge / --full)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="held-out pairs: token F1 / exact match of the reconstructions vs the first-sentence baseline"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="with --eval: an inverter adapter written by --train, loaded onto MODEL"),
    zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot", help="also score the untrained MODEL asked zero-shot"),
    target: Optional[str] = typer.Option(None, "--target", help="query this MODEL or http(s):// endpoint with the prompts of the data files for their outputs"),
    system_query: Optional[str] = typer.Option(None, "--system-query", help="with --target: send each prompt as the system prompt, this as the user turn"),
    save_pairs: Optional[Path] = typer.Option(None, "--save-pairs", help="with --target: write the collected pairs to this jsonl"),
    role: str = typer.Option("user", "--role", help="in messages rows, the hidden prompt is the last 'user' or 'system' message"),
    full: bool = typer.Option(False, "--full", help="full fine-tuning instead of LoRA"),
    merge: bool = typer.Option(False, "--merge", help="fold the LoRA adapters into the weights and write a model"),
    max_steps: int = typer.Option(100, "--max-steps", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 2e-4 LoRA, 2e-5 full)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(512, "--max-length", min=8, help="tokens per (packed) training sequence"),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="longest reconstructed prompt (tokens)"),
    target_tokens: int = typer.Option(128, "--target-tokens", min=1, help="with --target: longest collected output (tokens)"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N rows of each data file (0 = all)"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("fp32", "--dtype"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Prompt inversion (red team): train a small model to recover prompts from outputs; measure the leak."""
    import contextlib

    from datasets.utils.logging import disable_progress_bar

    from slmkit.collab.inversion import InvertConfig
    from slmkit.collab.inversion_run import InvertRun, run_inversion
    from slmkit.train.sft import LoraSettings, SFTConfig

    req = InvertRun(
        model=model, train=train, output=output, eval_data=eval_data, adapter=adapter, zero_shot=zero_shot,
        target=target, system_query=system_query, save_pairs=save_pairs, target_tokens=target_tokens, role=role,
        full=full, merge=merge, limit=limit, dtype=dtype, force=force,
        invert=InvertConfig(max_new_tokens=max_new_tokens),
        sft=SFTConfig(lora=None if full else LoraSettings(r=lora_r, alpha=2.0 * lora_r), max_steps=max_steps,
                      learning_rate=lr, batch_size=batch_size, max_length=max_length, save_steps=0, seed=seed),
    )
    disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's prints stay off stdout (--json)
        result = run_inversion(req)
    _print_inversion(result, json_out)


def _print_inversion(result: dict, json_out: bool) -> None:
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    console.print(kv_table("prompt inversion", [(k, v) for k, v in result.items() if k != "methods" and v is not None]))
    if "methods" in result:
        t = Table(title=f"reconstructed prompts on {result['n']} held-out pairs", title_justify="left")
        for col in ("method", "token_f1", "exact_match"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for name, r in result["methods"].items():
            t.add_row(name, f"{r['token_f1']:.3f}", f"{r['exact_match']:.3f}")
        console.print(t)

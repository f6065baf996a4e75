"""Collaboration verbs: speculate, route, judge."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import console, kv_table, print_json


def register(app: typer.Typer) -> None:
    app.command("speculate")(speculate)
    app.command("route")(route)
    app.command("judge")(judge)


def _encode(tok, prompt: str, chat: bool):
    import torch

    if chat:
        from slmkit.backends.hf import render_prompt

        ids = tok(render_prompt(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False).input_ids
    else:
        ids = tok(prompt).input_ids
    if not ids:
        pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [pid if pid is not None else 0]
    return torch.tensor(ids, dtype=torch.long)


def speculate(
    prompt: str = typer.Argument(..., help="the prompt (continued as raw text unless --chat)"),
    draft: str = typer.Option(..., "--draft", help="draft MODEL (same tokenizer as the target), 'lookup', or 'layers:N' (the target's first N blocks)"),
    target: str = typer.Option(..., "--target", help="target MODEL: default | hub id | directory | file.gguf"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (greedy output identical to the target) or bf16"),
    chat: bool = typer.Option(False, "--chat", help="wrap PROMPT in the target's chat template"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(4, "--k", min=0, help="draft length of the first step"),
    k_max: int = typer.Option(12, "--k-max", min=1, max=64, help="longest draft the adaptive rule may choose"),
    fixed: bool = typer.Option(False, "--fixed-k", help="keep k fixed instead of adapting it"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the target-alone run (speedup is then null)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Speculative decoding: the draft proposes, the target verifies; reports speed-up and acceptance."""
    import torch

    from slmkit.collab.speculative import SpecConfig, autoregressive, check_same_tokenizer, layer_draft, speculate as run
    from slmkit.errors import ConfigError
    from slmkit.models import load

    t_model, t_tok = load(target, dtype=dtype)
    if draft == "lookup":
        d_model = "lookup"
    elif draft.startswith("layers:"):
        try:
            n = int(draft.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--draft layers:N needs an integer N, got {draft!r}") from None
        d_model = layer_draft(t_model, n)
    else:
        d_model, d_tok = load(draft, dtype=dtype)
        check_same_tokenizer(t_tok, d_tok, "the draft and the target")
    eos = {t for t in (t_tok.eos_token_id, *_as_list(t_model.generation_config.eos_token_id)) if t is not None}
    cfg = SpecConfig(
        max_new_tokens=max_new_tokens, k=min(k, k_max), k_max=k_max, adaptive=not fixed,
        temperature=temperature, top_p=top_p, eos_token_ids=tuple(sorted(eos)),
    )
    ids = _encode(t_tok, prompt, chat)
    autoregressive(t_model, ids, SpecConfig(max_new_tokens=2))  # warm-up: first-call overheads off the clock
    base = None if no_baseline else autoregressive(t_model, ids, cfg, torch.Generator().manual_seed(seed))
    out = run(t_model, d_model, ids, cfg, torch.Generator().manual_seed(seed))
    body = [t for t in out.tokens if t not in eos]
    result = {
        "text": t_tok.decode(body, skip_special_tokens=True),
        "tokens": len(out.tokens),
        "tokens_per_s": out.tokens_per_s,
        "speedup": None if base is None else out.tokens_per_s / base.tokens_per_s,
        "acceptance_rate": out.acceptance_rate,
        "target_tokens_per_s": None if base is None else base.tokens_per_s,
        "drafted": out.drafted,
        "accepted": out.accepted,
        "target_calls": out.target_calls,
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


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def route(
    small: str = typer.Option(..., "--small", help="small MODEL (answers first)"),
    large: str = typer.Option(..., "--large", help="large MODEL or http(s):// OpenAI-compatible URL"),
    data: Path = typer.Option(..., "--data", help="jsonl with 'question' (and 'answer' to measure quality)"),
    escalate: Optional[float] = typer.Option(None, "--escalate", help="target escalation rate in [0, 1]"),
    quality: Optional[float] = typer.Option(None, "--quality", help="instead: target fraction of large-model quality in [0, 1]"),
    signal: str = typer.Option("logprob", "--signal", help="confidence signal: logprob | consistency | router"),
    calib_fraction: float = typer.Option(0.5, "--calib-fraction", help="share of labelled rows used to calibrate"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N rows (0 = all)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    samples: int = typer.Option(4, "--samples", min=2, help="samples per question for --signal consistency"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds per request to a large endpoint"),
    retries: int = typer.Option(2, "--retries", min=0, help="retries per request to a large endpoint"),
    fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="answer from the small model when the large one is unreachable"),
    dtype: str = typer.Option("fp32", "--dtype"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Cascade: the small model answers, low-confidence questions escalate to the large one."""
    from slmkit.collab.cascade import CascadeConfig, run_route

    cfg = CascadeConfig(
        signal=signal, escalate=escalate, quality=quality, calib_fraction=calib_fraction,
        max_new_tokens=max_new_tokens, samples=samples, timeout=timeout, retries=retries,
        fallback=fallback, seed=seed,
    )
    report = run_route(small, large, data, cfg, limit=limit, dtype=dtype)
    if json_out:
        print_json(report)
        return
    console.print(kv_table("cascade", [(k_, v) for k_, v in report.items() if k_ not in ("curve", "answers")]))


def judge(
    data: Path = typer.Option(..., "--data", help="jsonl with 'question', 'answer' and optional 'label' (1 = hallucinated)"),
    model: str = typer.Option("default", "--model", help="the judging (small) MODEL"),
    method: str = typer.Option("logprob", "--method", help="logprob | consistency"),
    samples: int = typer.Option(4, "--samples", min=2),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="flag items whose risk exceeds this"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N rows (TruthfulQA: N questions, 2N pairs)"),
    dtype: str = typer.Option("fp32", "--dtype"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Score (question, answer) pairs for hallucination risk (TruthfulQA.csv or jsonl); AUROC when labelled."""
    from slmkit.collab.judge import JudgeConfig, judge_file

    cfg = JudgeConfig(method=method, samples=samples, threshold=threshold)
    report = judge_file(model, data, cfg, limit=limit, dtype=dtype)
    if json_out:
        print_json(report)
        return
    console.print(kv_table("judge", [(k_, v) for k_, v in report.items() if k_ != "items"]))

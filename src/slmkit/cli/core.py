"""Core verbs: info, generate, chat, eval."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import (DEVICE_HELP, RegistryHelpCommand, console, human_bytes, human_count, kv_table,
                                print_json, registry_names)

DTYPE_HELP = "weights dtype: fp32 or bf16 (default fp32)"
FAST_DTYPE_HELP = ("weights dtype: fp32 or bf16 (default fp32; with --fast on a quantised FILE.gguf or a `slmkit quantize` "
                   "DIR the default runs its own codes, and an explicit --dtype runs its dequantised weights)")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("generate", cls=RegistryHelpCommand)(generate)
    app.command("chat", cls=RegistryHelpCommand)(chat)
    app.command("eval")(evaluate)


def info(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the model repo's own code"),
) -> None:
    """Architecture facts: parameters, shapes, attention, FFN, norms, memory."""
    from slmkit.models import describe, load_config

    facts = describe(load_config(model, trust_remote_code=trust_remote_code))
    if json_out:
        print_json({"model": model, **facts.to_dict()})
        return
    rows = [
        ("parameters", f"{human_count(facts.parameters)} ({facts.parameters:,})"),
        ("embedding / non-embedding", f"{human_count(facts.embedding_parameters)} / {human_count(facts.non_embedding_parameters)}"),
    ]
    if facts.experts:
        rows.append(("active per token", f"{human_count(facts.active_parameters)} ({facts.active_parameters:,})"))
    rows += [
        ("architecture", f"{facts.architecture} ({facts.model_type})"),
        ("layers", facts.layers),
        ("hidden size", facts.hidden_size),
        ("FFN", f"{facts.ffn}, intermediate {facts.intermediate_size}"),
        ("attention", f"{facts.attention}: {facts.attention_heads} heads, {facts.kv_heads} KV heads, head dim {facts.head_dim}"),
        ("activation", facts.activation),
        ("norm", facts.norm),
        ("tied embeddings", facts.tied_embeddings),
        ("context length", facts.context_length),
        ("vocabulary", facts.vocab_size),
        ("weights fp32 / bf16 / int8 / int4", " / ".join(human_bytes(v) for v in facts.weight_memory_bytes.values())),
        ("KV cache per 1k tokens fp32 / bf16", " / ".join(human_bytes(v) for v in facts.kv_cache_bytes_per_1k_tokens.values())),
    ]
    console.print(kv_table(model, rows))


def _prompt_of(tokenizer, prompt: str, chat: Optional[bool]):
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    return [{"role": "user", "content": prompt}] if use_chat else prompt


def _device_for(device: Optional[str], fast: bool):
    """``--device`` (unset: auto) for generate/eval; ``--fast`` is slmkit's CPU path, so it runs on the CPU."""
    from slmkit.errors import ConfigError
    from slmkit.models.device import resolve_device

    if fast:
        if device is not None and resolve_device(device).type != "cpu":
            raise ConfigError(f"--fast is slmkit's CPU path; it does not run on --device {device}",
                              "drop --fast to run the transformers loop on the GPU, or use --device cpu")
        return resolve_device("cpu")
    return resolve_device(device)


def _fast_backend(model: str, dtype: Optional[str], weights: str, kv: str, kv_budget: Optional[int]):
    from slmkit.runtime.backend import FastBackend

    # a quantised FILE.gguf or packed DIR runs its own codes unless --dtype is given
    return FastBackend.from_spec(model, dtype, weights, kv, kv_budget)


def _constraint_of(json_schema: Optional[Path], regex: Optional[str], grammar: Optional[Path]):
    """The --json-schema / --regex / --grammar constraint (at most one), its file read and checked."""
    from slmkit.errors import ConfigError, DataError
    from slmkit.runtime.constrain import Constraint

    given = [f for f, v in (("--json-schema", json_schema), ("--regex", regex), ("--grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} exclude each other: give one constraint")
    if regex is not None:
        return Constraint.regex(regex, name="--regex")
    path = json_schema if json_schema is not None else grammar
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {given[0]} file {path}: {getattr(err, 'strerror', None) or err}") from None
    if json_schema is not None:
        return Constraint.json_schema(text, name=f"--json-schema {path}")
    return Constraint.grammar(text, name=f"--grammar {path}")


def generate(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    prompt: str = typer.Argument(..., help="the prompt"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=0, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=FAST_DTYPE_HELP),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help="wrap the prompt in the chat template (default: when the model has one)"),
    json_out: bool = typer.Option(False, "--json"),
    fast: bool = typer.Option(False, "--fast", help="the fast CPU path (static KV cache; llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3; other architectures: transformers, with a warning)"),
    int8: bool = typer.Option(False, "--int8", help="with --fast: int8 weight-only matmuls (a quantised FILE.gguf or DIR: only with an explicit --dtype)"),
    int4: bool = typer.Option(False, "--int4", help="with --fast: int4 weight-only matmuls (groups of 32; slmkit's q4 kernel and fused decode step, else torch's kernel; a quantised FILE.gguf: only with an explicit --dtype)"),
    kv: str = typer.Option("full", "--kv", help="with --fast: KV policy " + registry_names("slmkit.runtime.kvcache", "KV_POLICIES")),
    kv_budget: Optional[int] = typer.Option(None, "--kv-budget", help="with --fast: tokens kept by streaming/h2o"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="constrain the output to JSON valid against this JSON Schema file"),
    regex: Optional[str] = typer.Option(None, "--regex", help="constrain the output to match this regular expression (Rust regex syntax)"),
    grammar: Optional[Path] = typer.Option(None, "--grammar", help="constrain the output to this grammar file (Lark, or llama.cpp's GBNF)"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP + " (unset: auto; --fast: the CPU; on a GPU the dtype defaults to bf16)"),
) -> None:
    """Generate a completion for PROMPT (optionally constrained to a JSON schema, a regex or a grammar)."""
    from slmkit.backends import GenParams, from_spec
    from slmkit.models.device import resolve_dtype

    constraint = _constraint_of(json_schema, regex, grammar)  # bad input fails before the model loads
    dev = _device_for(device, fast)
    backend = (_fast_backend(model, dtype, "int4" if int4 else "int8" if int8 else "native", kv, kv_budget) if fast
               else from_spec(model, dtype=resolve_dtype(dtype, dev), device=dev))
    params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, constraint=constraint)
    t0 = time.perf_counter()
    c = backend.generate([_prompt_of(backend.tokenizer, prompt, chat)], params)[0]
    dt = time.perf_counter() - t0
    if json_out:
        out = {"model": model, "prompt": prompt, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
               "seconds": dt, "tokens_per_s": c.tokens / dt if dt > 0 else None, "fast": fast}
        if json_schema is not None:
            import json

            try:
                out["json"] = json.loads(c.text)
            except ValueError:  # only when the token budget ran out first (finish_reason "length")
                out["json"] = None
        print_json(out)
    else:
        sys.stdout.write(c.text.strip() + "\n")


def chat(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=FAST_DTYPE_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    fast: bool = typer.Option(False, "--fast", help="the fast CPU path (static KV cache; llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3; other architectures: transformers, with a warning)"),
    int8: bool = typer.Option(False, "--int8", help="with --fast: int8 weight-only matmuls (a quantised FILE.gguf or DIR: only with an explicit --dtype)"),
    int4: bool = typer.Option(False, "--int4", help="with --fast: int4 weight-only matmuls (groups of 32; slmkit's q4 kernel and fused decode step, else torch's kernel; a quantised FILE.gguf: only with an explicit --dtype)"),
    kv: str = typer.Option("full", "--kv", help="with --fast: KV policy " + registry_names("slmkit.runtime.kvcache", "KV_POLICIES")),
    kv_budget: Optional[int] = typer.Option(None, "--kv-budget", help="with --fast: tokens kept by streaming/h2o"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP + " (unset: auto; --fast: the CPU; on a GPU the dtype defaults to bf16)"),
) -> None:
    """Chat in the terminal (chat template, tokens streamed). Empty line or Ctrl-D ends."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from slmkit.backends.hf import render_prompt
    from slmkit.models import load

    from slmkit.models.device import resolve_dtype

    dev = _device_for(device, fast)
    fb = _fast_backend(model, dtype, "int4" if int4 else "int8" if int8 else "native", kv, kv_budget) if fast else None
    m, tok = (fb.model, fb.tokenizer) if fb else load(model, dtype=resolve_dtype(dtype, dev), device=dev)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    render_prompt(tok, [{"role": "user", "content": "x"}])  # fails early without a chat template
    while True:
        try:
            line = input("you> ") if sys.stdin.isatty() else sys.stdin.readline()
        except EOFError:
            break
        line = line.strip()
        if not line:
            break
        messages.append({"role": "user", "content": line})
        if fb is not None:
            from slmkit.backends import GenParams

            reply = []
            sys.stdout.write("assistant> ")
            for item in fb.stream_text(messages, GenParams(max_new_tokens=max_new_tokens, temperature=temperature)):
                reply.append(item[0])
                sys.stdout.write(item[0])
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply).strip()})
            continue
        ids = tok(render_prompt(tok, messages), return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            do_sample=temperature > 0,
            pad_token_id=tok.pad_token_id,
        )
        kw.update(temperature=temperature) if temperature > 0 else kw.update(temperature=None, top_p=None, top_k=None)
        th = threading.Thread(target=m.generate, kwargs=kw, daemon=True)
        from slmkit.runtime.omp import release_pool

        release_pool()  # else this thread's idle OpenMP pool slows the generating thread (runtime/omp.py)
        th.start()
        reply = []
        sys.stdout.write("assistant> ")
        for piece in streamer:
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        th.join()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})


def evaluate(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    perplexity_file: Optional[Path] = typer.Option(None, "--perplexity", help="text file for sliding-window perplexity"),
    context: int = typer.Option(512, "--context", help="window length in tokens"),
    stride: Optional[int] = typer.Option(None, "--stride", help="tokens between windows (default: context)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="score only the first N tokens"),
    efficiency: bool = typer.Option(False, "--efficiency", help="measure load time, memory, prefill/decode speed"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP + " (default fp32; with --fast on a quantised FILE.gguf or DIR, unset = its own codes)"),
    fast: bool = typer.Option(False, "--fast", help="measure slmkit's fast path (what generate/serve --fast run), not the transformers loop"),
    int8: bool = typer.Option(False, "--int8", help="with --fast: int8 weights"),
    int4: bool = typer.Option(False, "--int4", help="with --fast: int4 weights (slmkit's q4 kernel)"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP + " (unset: auto; --fast: the CPU; on a GPU the dtype defaults to bf16)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate MODEL: perplexity on a text file and/or efficiency (of the transformers loop, or --fast)."""
    from slmkit.errors import ConfigError
    from slmkit.eval import EfficiencyConfig, PerplexityConfig, measure, perplexity, read_text
    from slmkit.models import load

    if perplexity_file is None and not efficiency:
        raise ConfigError("nothing to evaluate", "pass --perplexity FILE and/or --efficiency")
    if (int8 or int4) and not fast:
        raise ConfigError("--int8/--int4 choose the fast path's weights", "add --fast")
    if int8 and int4:
        raise ConfigError("--int8 and --int4 exclude each other")
    cfg = PerplexityConfig(context=context, stride=stride or context, max_tokens=max_tokens)
    text = read_text(perplexity_file) if perplexity_file is not None else None
    dev = _device_for(device, fast)
    if not fast and dev.type != "cpu":
        from slmkit.models.device import resolve_dtype

        dtype = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    m, tok = load(model, dtype=dtype or "fp32", device=dev)
    fm = path_name = None
    if fast:
        from slmkit.runtime.generate import FastConfig, build
        from slmkit.runtime.gguffast import build_gguf, exact_model, file_codes

        weights = "int4" if int4 else "int8" if int8 else "native"
        gguf = file_codes(model, dtype, weights)  # a quantised FILE.gguf or packed DIR runs its own codes unless --dtype is given
        fcfg = FastConfig(dtype=dtype if dtype in ("fp32", "bf16") else "fp32", weights=weights)
        exact = exact_model(m, fcfg) if gguf is None else None
        fm = build_gguf(gguf, fcfg, m) if gguf is not None else exact or build(m, fcfg)
        path_name = f"fast ({'file codes' if gguf is not None else weights if weights != 'native' else dtype or 'fp32'}"
        path_name += ", the file's blocks in full precision)" if exact is not None else ")"
    load_s = time.perf_counter() - t0
    result: dict = {"model": model, "dtype": dtype or "fp32", "device": str(dev), "path": path_name or "transformers",
                    "load_time_s": round(load_s, 3)}
    if text is not None:
        from slmkit.eval.efficiency import fast_logits_fn

        ppl = perplexity(m, tok, text, cfg, source=str(perplexity_file), logits_fn=fast_logits_fn(fm) if fm else None)
        result.update(perplexity=ppl.perplexity, nll=ppl.nll, perplexity_tokens=ppl.tokens, windows=ppl.windows,
                      context=ppl.context, stride=ppl.stride, perplexity_file=str(perplexity_file))
    if efficiency:
        from slmkit.eval.efficiency import measure_fast

        eff = measure_fast(fm, EfficiencyConfig(), load_time_s=load_s) if fm else measure(m, EfficiencyConfig(), load_time_s=load_s)
        result.update(
            prefill_tokens_per_s=eff.prefill_tokens_per_s,
            decode_tokens_per_s=eff.decode_tokens_per_s,
            time_to_first_token_s=eff.time_to_first_token_s,
            peak_rss_mb=eff.peak_rss_mb,
            threads=eff.threads,
        )
    if json_out:
        print_json(result)
        return
    rows = []
    if "perplexity" in result:
        rows += [("perplexity", f"{result['perplexity']:.3f}"),
                 ("tokens scored", f"{result['perplexity_tokens']:,} in {result['windows']} windows (context {context}, stride {cfg.stride})")]
    rows.append(("load time", f"{load_s:.2f} s"))
    if efficiency:
        rows += [
            ("prefill", f"{result['prefill_tokens_per_s']:.1f} tokens/s"),
            ("decode", f"{result['decode_tokens_per_s']:.1f} tokens/s"),
            ("time to first token", f"{result['time_to_first_token_s'] * 1000:.0f} ms"),
            ("peak RSS", f"{result['peak_rss_mb']:.0f} MB"),
            ("threads", result["threads"]),
        ]
    console.print(kv_table(f"{model} ({result['path']}, {dtype or 'fp32'})", rows))

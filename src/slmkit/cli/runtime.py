"""Runtime verbs: serve, fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import RegistryHelpCommand, console, human_bytes, kv_table, print_json, registry_names


def register(app: typer.Typer) -> None:
    app.command("serve", cls=RegistryHelpCommand)(serve)
    app.command("fit", cls=RegistryHelpCommand)(fit)


def _adapters(specs: list[str]) -> dict[str, str]:
    from slmkit.errors import ConfigError

    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH, got {s!r}")
        out[name] = path
    return out


def serve(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: loopback only)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY'"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 or bf16 (default fp32; a quantised FILE.gguf or `slmkit quantize` DIR by default runs its own codes, and an explicit --dtype its dequantised weights)"),
    int8: bool = typer.Option(False, "--int8", help="int8 weight-only matmuls (computes in bf16; a quantised FILE.gguf or DIR: only with an explicit --dtype)"),
    int4: bool = typer.Option(False, "--int4", help="int4 weight-only matmuls, groups of 32 (slmkit's q4 kernel: int8 activations; without a C compiler torch's kernel in bf16; a quantised FILE.gguf or DIR: only with an explicit --dtype)"),
    name: Optional[str] = typer.Option(None, "--name", help="model id the API reports (default: MODEL)"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="sequences decoded together (continuous batching)"),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="waiting requests before HTTP 429"),
    timeout: float = typer.Option(300.0, "--timeout", min=0.1, help="seconds a request may run"),
    max_body: int = typer.Option(1_000_000, "--max-body-bytes", min=1, help="larger request bodies get HTTP 413"),
    idle_timeout: float = typer.Option(30.0, "--idle-timeout", min=0.01, help="close a connection that sends no complete request (headers) within this many seconds of opening or of its last response"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=DIR: serve a LoRA adapter as model NAME (repeatable)"),
    large: Optional[str] = typer.Option(None, "--large", help="pair MODEL (the small one) with this large MODEL or http(s):// URL"),
    mode: Optional[str] = typer.Option(None, "--mode", help="with --large: " + registry_names("slmkit.collab.serving", "MODES")),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="cascade: escalate when the small answer's confidence is below this (default -1.0 for --signal logprob, a mean token log-prob; 0.5 otherwise)"),
    signal: str = typer.Option("logprob", "--signal", help="cascade: confidence signal, " + registry_names("slmkit.collab.cascade", "SIGNALS") + " (probe needs --probe FILE; router is refused here: it trains on labelled rows, see `slmkit route`)"),
    probe: Optional[Path] = typer.Option(None, "--probe", help="cascade --signal probe: a probe file from `slmkit judge --signal probe --save-probe FILE`"),
    samples: int = typer.Option(4, "--samples", min=2, help="cascade --signal consistency: sampled answers per request"),
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (streaming, continuous batching).

    With --large and --mode, serve MODEL paired with a large model (streaming too; each response
    carries "slmkit" metadata: escalated, confidence, acceptance_rate, redacted), under the same
    --max-body-bytes, --max-queue, --timeout, --idle-timeout and --api-key (requests run one at a time).
    """
    from slmkit.errors import ConfigError

    if (large is None) != (mode is None):
        raise ConfigError("--large and --mode go together", "e.g. --large http://host:8000 --mode cascade")
    from slmkit.runtime.servecore import ServerConfig

    cfg = ServerConfig(api_key=api_key, max_body_bytes=max_body, request_timeout_s=timeout, max_queue=max_queue,
                       idle_timeout_s=idle_timeout)
    if large is not None and (adapter or int8 or int4):
        raise ConfigError("--adapter, --int8 and --int4 apply to `slmkit serve MODEL` alone, not to --large/--mode pairs")
    if large is not None:  # same limits, queue bound, timeouts and key as the single-model server
        from slmkit.collab.serving import build_backend, create_app
        from slmkit.runtime.servecore import run as run_app

        from slmkit.collab.cascade import CascadeConfig

        if mode != "cascade" and (signal != "logprob" or probe is not None or threshold is not None):
            raise ConfigError("--signal, --probe and --threshold apply to --mode cascade")
        ccfg = CascadeConfig(signal=signal, samples=samples, probe=None if probe is None else str(probe))
        if threshold is None:
            threshold = -1.0 if signal == "logprob" else 0.5
        backend = build_backend(model, large, mode, dtype=dtype or "fp32", threshold=threshold, timeout=timeout, cascade=ccfg)
        run_app(create_app(backend, name=name, cfg=cfg), host, port, cfg)
        return
    from slmkit.backends import HFBackend
    from slmkit.runtime.engine import EngineConfig
    from slmkit.runtime.generate import FastConfig
    from slmkit.runtime.gguffast import file_codes
    from slmkit.runtime.server import serve as run

    weights = "int4" if int4 else "int8" if int8 else "native"
    # a quantised FILE.gguf or packed quantised DIR serves its own codes unless --dtype is given; other
    # architectures serve through transformers' forward (require_fast=False)
    gguf = file_codes(model, dtype, weights, require_fast=False)
    fast = FastConfig(dtype=dtype if dtype in ("fp32", "bf16") else "fp32", weights=weights)
    adapters = _adapters(adapter)
    backend = HFBackend.from_spec(model, dtype=dtype or "fp32")
    if name:
        backend.name = name
    merged = None
    if adapters:
        from slmkit.train.adapters import merged_models

        merged = merged_models(backend.model, backend.tokenizer, adapters, base_name=backend.name)
    run(backend, host=host, port=port,
        cfg=cfg, engine_cfg=EngineConfig(max_batch=max_batch, max_queue=max_queue), fast_cfg=fast, extra_models=merged, gguf=gguf)


def fit(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf | device-free config"),
    memory: str = typer.Option(..., "--memory", help="budget (4GB, 512MB, 6GiB) or a preset: phone-4gb, phone-8gb, rpi5-4gb, rpi5-8gb, laptop-16gb"),
    context: str = typer.Option("4k", "--context", help="context length in tokens (e.g. 8k, 2048)"),
    precision: str = typer.Option("bf16", "--precision", help="weights: fp32, bf16, int8 or int4"),
    kv: str = typer.Option("full", "--kv", help="KV policy: " + registry_names("slmkit.runtime.kvcache", "KV_POLICIES")),
    kv_budget: Optional[int] = typer.Option(None, "--kv-budget", help="tokens kept by streaming/h2o (default 1024)"),
    batch: int = typer.Option(1, "--batch", min=1, help="concurrent sequences"),
    overhead: Optional[str] = typer.Option(None, "--overhead", help="runtime overhead (default: measured PyTorch runtime)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Will MODEL fit in MEMORY at this context? Weights + KV + activations + runtime overhead, and the largest context/batch that fits."""
    from slmkit.runtime.fit import FitConfig, plan

    res = plan(model, FitConfig.parse(memory=memory, context=context, precision=precision, kv=kv, kv_budget=kv_budget,
                                      batch=batch, overhead=overhead))
    if json_out:
        print_json(res)
        return
    rows = [
        ("device / budget", f"{res.device} / {human_bytes(res.memory_bytes)}"),
        ("kernel", f"{res.kernel} ({res.kernel_cpu})"),
        ("weights", f"{human_bytes(res.weights_bytes)} ({res.precision})"),
        ("KV cache", f"{human_bytes(res.kv_bytes)} ({res.kv}, {res.context} tokens x {res.batch})"),
        ("activations", human_bytes(res.activation_bytes)),
        ("runtime overhead", human_bytes(res.overhead_bytes)),
        ("total", f"{human_bytes(res.total_bytes)} ({100 * res.total_bytes / res.memory_bytes:.0f}% of budget)"),
        ("fits", "yes" if res.fits else "NO"),
        ("largest context (batch 1)", f"{res.max_context:,} tokens" if res.max_context else "none"),
        (f"largest batch (context {res.context})", res.max_batch),
    ]
    console.print(kv_table(f"fit {model}", rows))

"""Runtime verbs: serve."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: loopback only)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY'"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16"),
    name: Optional[str] = typer.Option(None, "--name", help="model id the API reports (default: MODEL)"),
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API."""
    from slmkit.backends import HFBackend
    from slmkit.runtime.server import serve as run

    backend = HFBackend.from_spec(model, dtype=dtype)
    if name:
        backend.name = name
    run(backend, host=host, port=port, api_key=api_key)

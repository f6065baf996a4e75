"""Backends: one Protocol for generating and scoring text, over local models or HTTP endpoints."""

from slmkit.backends.base import Backend, Completion, GenParams, PartialFailure, Prompt, TokenScores
from slmkit.backends.hf import HFBackend
from slmkit.backends.openai import OpenAIBackend
from slmkit.errors import ConfigError


def is_endpoint(spec: str | None) -> bool:
    """Whether a model spec is an OpenAI-compatible endpoint (``http(s)://...[#model]``)."""
    return spec is not None and spec.startswith(("http://", "https://"))


def check_concurrency(concurrency: int, *specs: str | None) -> None:
    """``--concurrency N`` (N > 1) needs at least one endpoint among ``specs`` (a local model batches instead)."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    if concurrency > 1 and not any(is_endpoint(s) for s in specs):
        named = ", ".join(s for s in specs if s) or "the model"
        raise ConfigError(f"--concurrency {concurrency} applies to http(s) endpoints, and {named} is a local model",
                          "pass an endpoint URL (e.g. http://127.0.0.1:8000 from `slmkit serve`), or drop --concurrency")


def from_spec(spec: str, dtype: str = "fp32", api_key: str | None = None, concurrency: int = 1,
              device: str = "cpu", timeout: float = 60.0, retries: int = 3, backoff: float = 0.5) -> Backend:
    """``http(s)://...`` → :class:`OpenAIBackend` (``URL#model`` picks a model; ``concurrency`` requests in
    flight at once, each with ``timeout`` seconds and ``retries`` retries ``backoff`` seconds apart, doubling);
    anything else → :class:`HFBackend`
    on ``device`` (cpu | cuda | cuda:N | auto; it batches in-process, ``concurrency`` is unused)."""
    if is_endpoint(spec):
        url, _, model = spec.partition("#")
        return OpenAIBackend(url, model=model or None, api_key=api_key, concurrency=concurrency, timeout=timeout,
                             retries=retries, backoff=backoff)
    from slmkit.models import load

    model, tok = load(spec, dtype=dtype, device=device)
    return HFBackend(model, tok, name=spec)


def from_model(model, tokenizer, name: str | None = None, batch_size: int = 8) -> Backend:
    """A loaded transformers model and its tokenizer as a :class:`Backend` (in-process, ``batch_size`` rows
    per scoring pass), for code that should see only the Protocol (collab, trust)."""
    return HFBackend(model, tokenizer, name=name, batch_size=batch_size)


__all__ = ["Backend", "Completion", "GenParams", "HFBackend", "OpenAIBackend", "PartialFailure", "Prompt", "TokenScores",
           "check_concurrency", "from_model", "from_spec", "is_endpoint"]

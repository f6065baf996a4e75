"""Backends: one Protocol for generating and scoring text, over local models or HTTP endpoints."""

from slmkit.backends.base import Backend, Completion, GenParams, Prompt, TokenScores
from slmkit.backends.hf import HFBackend
from slmkit.backends.openai import OpenAIBackend


def from_spec(spec: str, dtype: str = "fp32", api_key: str | None = None) -> Backend:
    """``http(s)://...`` → :class:`OpenAIBackend` (``URL#model`` picks a model); anything else → :class:`HFBackend`."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return OpenAIBackend(url, model=model or None, api_key=api_key)
    return HFBackend.from_spec(spec, dtype=dtype)


__all__ = ["Backend", "Completion", "GenParams", "HFBackend", "OpenAIBackend", "Prompt", "TokenScores", "from_spec"]

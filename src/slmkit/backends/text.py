"""Prompt text helpers every backend and its callers share (no model needed).

A :data:`~slmkit.backends.base.Prompt` is raw text or a chat; :func:`render_prompt` turns it into
the text a tokenizer reads, :func:`truncate_at_stop` cuts a completion at its first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from slmkit.backends.base import Prompt
from slmkit.backends.stream import stop_index
from slmkit.errors import UnsupportedModelError


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Raw text stays as is; a chat is rendered with the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedModelError(
            "this model's tokenizer has no chat template, so chat messages cannot be formatted",
            "pass raw text prompts, or use an instruction-tuned model",
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``(text cut before its first stop string, whether one was found)``."""
    cut = stop_index(text, stops)
    return (text[:cut], True) if cut >= 0 else (text, False)


def token_id_list(x) -> list[int]:
    """A token id, a list of them or None (as ``generation_config.eos_token_id`` holds) as a list."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]

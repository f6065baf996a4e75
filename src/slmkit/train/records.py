"""Reading SFT and preference records from jsonl; every error names the file, line and field."""

from __future__ import annotations

from pathlib import Path

from slmkit.data.readers import iter_jsonl as iter_rows
from slmkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """Validate a list of ``{"role", "content"}`` messages; ``where`` is ``file:line`` for errors."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: {field}[{i}] is missing field '{key}'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def as_messages(value, where: str, field: str, role: str) -> list[dict]:
    """A string becomes one ``role`` message; a list is validated as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, field)


def read_sft(path: str | Path, limit: int = 0) -> list[list[dict]]:
    """Conversations from ``{"messages": [...]}`` or ``{"prompt", "completion"}`` rows.

    Each conversation must contain at least one assistant message (the tokens trained on).
    """
    out = []
    for lineno, row in iter_rows(path, limit):
        where = f"{path}:{lineno}"
        if "messages" in row:
            msgs = check_messages(row["messages"], where)
        elif "prompt" in row or "completion" in row:
            for key in ("prompt", "completion"):
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}' (a prompt/completion row needs both)")
            msgs = as_messages(row["prompt"], where, "prompt", "user") + as_messages(
                row["completion"], where, "completion", "assistant"
            )
        else:
            raise DataError(
                f"{where}: missing field 'messages' (or 'prompt' and 'completion')",
                'each line must be {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}',
            )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so there is nothing to train on")
        out.append(msgs)
    if not out:
        raise DataError(f"data file {path} has no rows")
    return out


def read_preferences(path: str | Path, limit: int = 0) -> list[dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` as conversational records.

    ``prompt`` is a string (one user turn) or a list of messages; ``chosen`` and
    ``rejected`` are strings (one assistant turn) or lists of assistant messages.
    """
    out = []
    for lineno, row in iter_rows(path, limit):
        where = f"{path}:{lineno}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(
                    f"{where}: missing field '{key}'",
                    'each line must be {"prompt": ..., "chosen": ..., "rejected": ...} '
                    "(convert hh-rlhf style dialogues with slmkit.train.dpo.split_hh)",
                )
        out.append(
            {
                "prompt": as_messages(row["prompt"], where, "prompt", "user"),
                "chosen": as_messages(row["chosen"], where, "chosen", "assistant"),
                "rejected": as_messages(row["rejected"], where, "rejected", "assistant"),
            }
        )
    if not out:
        raise DataError(f"data file {path} has no rows")
    return out

"""Reading SFT and preference records from jsonl; every error names the file, line and field.

SFT rows may be tool-use conversations in OpenAI's format: ``{"messages": [...], "tools": [...]}``
with assistant ``tool_calls`` (``{id, type: function, function: {name, arguments}}``, arguments as
JSON text or an object) and ``tool`` messages carrying a call's result. They are read with the
server's own request checks (:mod:`slmkit.runtime.tools`), so a row trains exactly what a request of
the same shape would be rendered as.
"""

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


def _uses_tools(row: dict) -> bool:
    msgs = row.get("messages")
    return "tools" in row or (isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls") is not None) for m in msgs))


def check_tool_conversation(row: dict, where: str) -> dict:
    """A tool-use row as ``{"messages", "tools"}``: messages through the server's checks (arguments parsed
    to objects), every call to a function ``tools`` offers with arguments valid against its parameters,
    and every ``tool`` message answering a call made before it (by ``tool_call_id`` when given)."""
    import jsonschema

    from slmkit.runtime import tools as tl
    from slmkit.runtime.servecheck import ApiError

    msgs = row.get("messages")
    if isinstance(msgs, list):
        for i, m in enumerate(msgs):
            if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
    try:
        offered = tl.tools_of(row)
        msgs = tl.chat_messages(row)
    except ApiError as err:
        raise DataError(f"{where}: {err.message}") from None
    params = {t["function"]["name"]: t["function"]["parameters"] for t in offered}
    pending: list = []  # ids of the calls not yet answered (None for a call without an id)
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            pending = []
            for c in m.get("tool_calls", []):
                name, args = c["function"]["name"], c["function"]["arguments"]
                if name not in params:
                    raise DataError(f"{where}: messages[{i}] calls {name!r}, which 'tools' does not offer "
                                    f"(offered: {', '.join(params) or 'none'})")
                if not isinstance(args, dict):
                    raise DataError(f"{where}: messages[{i}]: arguments of {name!r} must be a JSON object")
                try:
                    jsonschema.validate(args, params[name])
                except jsonschema.ValidationError as err:
                    at = "/".join(str(p) for p in err.absolute_path)
                    raise DataError(f"{where}: messages[{i}]: arguments of {name!r} do not match its parameters"
                                    f"{f' at {at}' if at else ''}: {err.message}") from None
                pending.append(c.get("id"))
        elif m["role"] == "tool":
            if not pending:
                raise DataError(f"{where}: messages[{i}] is a tool result without a preceding tool call",
                                "a tool message must follow an assistant message with tool_calls")
            cid = m.get("tool_call_id")
            if cid is not None and cid not in pending:
                raise DataError(f"{where}: messages[{i}].tool_call_id {cid!r} answers no call of the preceding assistant message")
            pending.remove(cid if cid is not None else pending[0])
        else:
            pending = []
    return {"messages": msgs, "tools": offered}


def read_sft(path: str | Path, limit: int = 0) -> list:
    """Conversations from ``{"messages": [...]}`` or ``{"prompt", "completion"}`` rows.

    A conversation is its list of messages, or ``{"messages", "tools"}`` for a tool-use row (see the
    module docstring). Each must contain at least one assistant message (the tokens trained on).
    """
    out = []
    for lineno, row in iter_rows(path, limit):
        where = f"{path}:{lineno}"
        if "messages" in row and _uses_tools(row):
            conv = check_tool_conversation(row, where)
            if not any(m["role"] == "assistant" for m in conv["messages"]):
                raise DataError(f"{where}: no assistant message, so there is nothing to train on")
            out.append(conv)
            continue
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

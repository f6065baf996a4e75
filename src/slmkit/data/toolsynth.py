"""Teacher-generated tool-use data: a call for each user prompt, valid by construction (issue 22).

The teacher sees each prompt as ``slmkit serve`` would show it a chat request with ``tools``
(:func:`slmkit.runtime.tools.render`: the chat template's own tool support, or the documented
fallback system prompt) and decodes under the tool-call grammar of ``tool_choice`` ``required``
(any offered function) or a named function (:func:`slmkit.runtime.tools.call_grammar`), so every
reply is one ``<tool_call>`` block whose arguments match that function's ``parameters``. The reply
is parsed by the server's parser (:func:`slmkit.runtime.tools.parse_reply`), checked against the
schema once more, and written as an OpenAI-format conversation, the row shape ``slmkit sft`` trains
on::

    {"id": ..., "tools": [...], "messages": [{"role": "user", ...},
     {"role": "assistant", "content": null, "tool_calls": [{"id", "type": "function",
      "function": {"name", "arguments": "<JSON text>"}}]}], "meta": {...}}

Grammar-constrained decoding makes the *form* right, not the *choice*: a small teacher still picks
wrong functions and values, so what this data is worth is measured by ``bench/function_calling.py``
(:mod:`slmkit.eval.toolcalls`). Output is appended and flushed one row at a time and reruns skip
prompts already answered, as for :func:`slmkit.data.synth.generate_dataset` (same file rules).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from slmkit.backends.base import Backend, GenParams
from slmkit.data.synth import PromptItem, SynthReport, append_row, open_synth_output
from slmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolSynthConfig:
    """Knobs of :func:`generate_tool_dataset`."""

    tool_choice: str = "required"  #: "required" (any offered function) or the name of the function to call
    parallel: bool = False  #: allow several calls in one reply
    n: int = 0  #: accepted rows to produce at most (0 = one per prompt)
    max_new_tokens: int = 160  #: reply budget (the grammar's close-out finishes the call within it)
    temperature: float = 0.0  #: 0 = greedy
    seed: int = 0
    batch_size: int = 8  #: prompts per teacher call (each keeps its own seed: same replies at any size)

    def __post_init__(self):
        if self.n < 0 or self.max_new_tokens < 8 or self.batch_size < 1:
            raise ConfigError(f"n must be >= 0, max_new_tokens >= 8 and batch_size >= 1, got {self.n}, "
                              f"{self.max_new_tokens}, {self.batch_size}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")


def check_tools(value, what: str) -> list[dict]:
    """OpenAI tool objects (``{type: function, function: {name, description, parameters}}``; bare function
    specs ``{name, description, parameters}`` are wrapped), validated as the server validates ``tools``."""
    from slmkit.runtime import tools as tl
    from slmkit.runtime.servecheck import ApiError

    if not isinstance(value, list) or not value:
        raise DataError(f"{what} must be a non-empty JSON list of function specs")
    wrapped = [{"type": "function", "function": t} if isinstance(t, dict) and "function" not in t and "name" in t else t
               for t in value]
    try:
        return tl.tools_of({"tools": wrapped})
    except ApiError as err:
        raise DataError(f"{what}: {err.message}") from None


def read_tools(path: str | Path) -> list[dict]:
    """The functions of a tools file: a JSON list of OpenAI function specs (see :func:`check_tools`)."""
    from slmkit.data.readers import json_line, read_text

    path = Path(path)
    return check_tools(json_line(read_text(path, "tools file"), str(path)), f"tools file {path}")


def check_choice(tools: list[dict], choice: str) -> str:
    names = [t["function"]["name"] for t in tools]
    if choice != "required" and choice not in names:
        raise ConfigError(f"tool choice {choice!r} is neither 'required' nor an offered function ({', '.join(names)})")
    return choice


def backend_prompt(backend: Backend, messages: list[dict], tools: list[dict]) -> str:
    """The text a local backend continues for a chat with ``tools``: the server's rendering
    (:func:`slmkit.runtime.tools.render`), less a leading BOS the backend's tokenizer adds itself."""
    from slmkit.runtime.tools import render

    tok = getattr(backend, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"tool-call decoding needs a local model (its tokenizer masks the output), not {backend.name}",
                          "pass a model directory, hub id, file.gguf or 'default'")
    text = render(tok, messages, tools)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("", add_special_tokens=True).input_ids[:1] == [tok.bos_token_id]:
        text = text[len(bos):]
    return text


def _prompt_seed(seed: int, pid: str) -> int:
    """A reply's sampling seed depends only on (seed, prompt id), as in :func:`slmkit.data.synth.generate_dataset`."""
    return seed * 1_000_003 + int(hashlib.sha1(pid.encode()).hexdigest()[:8], 16)


def checked_calls(reply: str, tools: list[dict]) -> tuple[list[dict], str | None]:
    """The OpenAI ``tool_calls`` of a reply (arguments as JSON text) and why they are unusable (None: fine)."""
    import jsonschema

    from slmkit.runtime.tools import parse_reply

    msg = parse_reply(reply)
    calls = msg.get("tool_calls") or []
    if not calls:
        return [], "no_call"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for c in calls:
        name = c["function"]["name"]
        try:
            args = json.loads(c["function"]["arguments"])
            jsonschema.validate(args, params[name])
        except (KeyError, ValueError, jsonschema.ValidationError):
            return calls, "invalid_call"
    return calls, None


def generate_tool_dataset(teacher: Backend, prompts: list[PromptItem], tools: list[dict], output: str | Path,
                          cfg: ToolSynthConfig = ToolSynthConfig(), force: bool = False) -> SynthReport:
    """Have ``teacher`` call one of ``tools`` for each prompt (constrained), append the conversations to ``output``.

    Resumable and refusing foreign files exactly like :func:`slmkit.data.synth.generate_dataset`;
    replies without a usable call (the budget ran out before the call closed) go to
    ``<output>.rejected.jsonl``.
    """
    from slmkit.runtime.tools import call_grammar

    choice = check_choice(tools, cfg.tool_choice)
    constraint = call_grammar(tools, choice, cfg.parallel)
    output, rejected_path, kept, done = open_synth_output(output, force)
    target = cfg.n or len(prompts)
    report = SynthReport(str(output), len(kept), 0, 0)
    pending = [item for item in prompts if item.id not in done]
    report.skipped_done = len(prompts) - len(pending)
    while pending and report.accepted < target:
        take = min(cfg.batch_size, target - report.accepted)
        batch, pending = pending[:take], pending[take:]
        params = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, constraint=constraint,
                           seeds=tuple(_prompt_seed(cfg.seed, it.id) for it in batch))
        texts = [backend_prompt(teacher, it.messages, tools) for it in batch]
        for item, c in zip(batch, teacher.generate(texts, params)):
            report.generated += 1
            calls, reason = checked_calls(c.text, tools)
            meta = {"teacher": teacher.name, "finish_reason": c.finish_reason, "tool_choice": choice}
            if reason is not None:
                report.rejected[reason] = report.rejected.get(reason, 0) + 1
                append_row(rejected_path, {"id": item.id, "reason": reason, "reply": c.text, "meta": meta})
                continue
            for k, call in enumerate(calls):  # ids that do not change between runs
                call["id"] = "call_" + hashlib.sha1(f"{item.id}/{k}".encode()).hexdigest()[:24]
            answer = {"role": "assistant", "content": None, "tool_calls": calls}
            append_row(output, {"id": item.id, "tools": tools, "messages": [*item.messages, answer], "meta": meta})
            report.accepted += 1
    return report

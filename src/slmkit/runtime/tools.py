"""Structured output and tool calling for the OpenAI-compatible server (issue 22).

Request side: :func:`structured_of` reads ``response_format`` (``text``, ``json_object``,
``json_schema`` with ``{name, schema, strict}``), ``tools`` (``{"type": "function", "function":
{name, description, parameters}}``), ``tool_choice`` (``"none"``, ``"auto"``, ``"required"`` or
``{"type": "function", "function": {"name"}}``) and ``parallel_tool_calls``, and turns them into a
:class:`~slmkit.runtime.constrain.Constraint` that the engine applies as a token mask. Every
refusal is a 400 in OpenAI's shape naming the field.

Prompt: the chat template's own tool support when it has one (``apply_chat_template(...,
tools=...)``, e.g. Qwen2.5, SmolLM3, Hermes); otherwise a system message listing the functions
(:data:`FALLBACK_SYSTEM`). Assistant ``tool_calls`` and ``tool`` results in the history are passed
to a template that knows them, and written as ``<tool_call>`` / ``<tool_response>`` text for one
that does not.

Output format of a call (Hermes / Qwen2.5's, which the grammar enforces)::

    <tool_call>
    {"name":"get_weather","arguments":{"city":"Paris"}}
    </tool_call>

``tool_choice`` ``required`` or a named function: the output is one call (or several, one per
line, when ``parallel_tool_calls`` is true) with arguments valid against that function's
``parameters``; ``auto``: either such calls or plain text that never contains ``<tool_call>``;
``none``: plain text, and the functions are left out of the prompt. :class:`CallStream` turns the
generated text into OpenAI's ``tool_calls`` (streamed as deltas: the call's id and name first, then
its arguments piece by piece).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from slmkit.errors import SlmkitError
from slmkit.runtime.constrain import Constraint
from slmkit.runtime.servecheck import ApiError, bad, brief, flag, messages_of

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  #: OpenAI's rule for function and schema names
CHOICES = ("none", "auto", "required")
FALLBACK_SYSTEM = (
    "You may call functions to answer. The functions, as JSON schemas:\n{tools}\n"
    "To call a function, answer with only\n<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n"
    "</tool_call>\n(one block per call). Otherwise answer in plain text."
)
_JSON_OPTS = {"whitespace_flexible": False}
_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class Structured:
    """What a chat request asks of its output's form."""

    constraint: Constraint | None = None  #: applied as a token mask (None: free text)
    param: str | None = None  #: the request field the constraint came from (for errors)
    tools: list[dict] = field(default_factory=list)  #: the functions offered (validated OpenAI tool objects)
    prompt_tools: list[dict] = field(default_factory=list)  #: the tools shown to the model (none for tool_choice "none")
    calls: bool = False  #: the output may hold tool calls (parse it)


def _schema(v, param: str, what: str):
    """A JSON schema from a request, meta-checked (400 naming ``param`` when it is not one)."""
    from slmkit.runtime.constrain import check_schema

    try:
        return check_schema(v, what)
    except SlmkitError as err:
        raise bad(str(err).splitlines()[0], param) from None


def response_format_of(body: dict) -> tuple[Constraint | None, str | None]:
    """``response_format`` as a constraint (None for absent or ``text``) and the field to blame."""
    rf = body.get("response_format")
    if rf is None:
        return None, None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad(f"response_format must be an object with a type, got {brief(rf)}", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None, None
    if kind == "json_object":
        return Constraint.json_object(), "response_format"
    if kind != "json_schema":
        raise bad(f"response_format.type must be text, json_object or json_schema, got {brief(kind)}", "response_format")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad("response_format.json_schema must be an object {name, schema, strict}", "response_format")
    name = js.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad(f"response_format.json_schema.name must match [a-zA-Z0-9_-]{{1,64}}, got {brief(name)}", "response_format")
    if js.get("strict") is not None and not isinstance(js.get("strict"), bool):
        raise bad("response_format.json_schema.strict must be true or false", "response_format")
    schema = js.get("schema", {"type": "object"})
    schema = _schema(schema, "response_format", f"response_format.json_schema.schema ({name})")
    try:
        return Constraint.json_schema(schema, name=f"response_format schema {name!r}"), "response_format"
    except SlmkitError as err:
        raise bad(str(err).splitlines()[0], "response_format") from None


def tools_of(body: dict) -> list[dict]:
    """A request's (or a training row's) ``tools``, checked: OpenAI function tools (``{type: function, function:
    {name, description, parameters}}``) with unique names and valid parameter schemas, else a 400 naming the
    field; [] when there are none."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("tools must be a list of {type: function, function: {name, description, parameters}}", "tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad(f"tools[{i}].function.name must match [a-zA-Z0-9_-]{{1,64}}, got {brief(name)}", "tools")
        if name in names:
            raise bad(f"tools[{i}]: function {name!r} is offered twice", "tools")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise bad(f"tools[{i}].function.description must be a string", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        params = _schema(params, "tools", f"tools[{i}].function.parameters ({name})")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def _choice(body: dict, tools: list[dict]) -> str:
    """``tool_choice`` as "none", "auto", "required" or a function's name."""
    tc = body.get("tool_choice")
    if tc is None:
        return "auto" if tools else "none"
    if isinstance(tc, str):
        if tc not in CHOICES:
            raise bad(f"tool_choice must be none, auto, required or {{type: function, function: {{name}}}}, got {brief(tc)}", "tool_choice")
        if tc != "none" and not tools:
            raise bad(f"tool_choice {tc!r} needs tools", "tool_choice")
        return tc
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(tc, dict) or tc.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"tool_choice must be none, auto, required or {{type: function, function: {{name}}}}, got {brief(tc)}", "tool_choice")
    offered = [t["function"]["name"] for t in tools]
    if fn["name"] not in offered:
        raise bad(f"tool_choice names function {brief(fn['name'])}, which tools do not offer (offered: {', '.join(offered) or 'none'})",
                  "tool_choice")
    return fn["name"]


def call_grammar(tools: list[dict], choice: str, parallel: bool) -> Constraint:
    """The Lark grammar (llguidance dialect: ``%json`` embeds a JSON schema) of the output under ``choice``."""
    named = choice not in CHOICES  # one function by name
    fns = [t["function"] for t in tools if not named or t["function"]["name"] == choice]
    variants = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    body = {"anyOf": variants, "x-guidance": _JSON_OPTS} if len(variants) > 1 else {**variants[0], "x-guidance": _JSON_OPTS}
    calls = 'call ("\\n" call)*' if parallel else "call"
    lines = [f"calls: {calls}", f'call: "{OPEN}\\n" body "\\n{CLOSE}"', f"body: %json {json.dumps(body)}"]
    if choice == "auto":  # plain text that never opens a call, or calls
        start = ["start: calls | TEXT", "TEXT: /(.|\\n)+/ & ~/(.|\\n)*<tool_call>(.|\\n)*/"]
    else:
        start = ["start: calls"]
    return Constraint.grammar("\n".join(start + lines), name="the tool-call grammar")


def structured_of(body: dict) -> Structured:
    """``response_format`` / ``tools`` / ``tool_choice`` of a chat request, validated (ApiError 400 naming the field)."""
    constraint, param = response_format_of(body)
    tools = tools_of(body)
    choice = _choice(body, tools)
    parallel = flag(body, "parallel_tool_calls", True)
    if not tools or choice == "none":
        return Structured(constraint, param, tools, [], False)
    if constraint is not None:
        raise bad("response_format json_object/json_schema cannot be combined with tools unless tool_choice is none", "response_format")
    try:
        grammar = call_grammar(tools, choice, parallel)
    except SlmkitError as err:
        raise bad(str(err).splitlines()[0], "tools") from None
    return Structured(grammar, "tools", tools, tools, True)


# --------------------------------------------------------------------------- messages and the prompt


def chat_messages(body: dict) -> list[dict]:
    """``messages`` validated, keeping assistant ``tool_calls`` (arguments parsed to objects) and ``tool_call_id``."""
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return messages_of(body)  # its refusal
    plain, extra = [], []
    for i, m in enumerate(msgs):
        more = {}
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"messages[{i}].tool_calls must be a list", "messages")
            more["tool_calls"] = [_history_call(c, i) for c in calls]
            m = {**m, "content": m.get("content") or ""}
        if isinstance(m, dict) and m.get("role") == "tool":
            if m.get("tool_call_id") is not None and not isinstance(m.get("tool_call_id"), str):
                raise bad(f"messages[{i}].tool_call_id must be a string", "messages")
            more["tool_call_id"] = m.get("tool_call_id")
        plain.append(m)
        extra.append(more)
    return [{**m, **x} for m, x in zip(messages_of({"messages": plain}), extra)]


def _history_call(c, i: int) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"messages[{i}].tool_calls entries must be {{id, type: function, function: {{name, arguments}}}}", "messages")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise bad(f"messages[{i}].tool_calls: arguments of {fn['name']!r} are not valid JSON", "messages") from None
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders ``tools`` (it mentions them)."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        return "tool_use" in tpl or any("tools" in str(v) for v in tpl.values())
    return isinstance(tpl, str) and "tools" in tpl


def format_call(name: str, arguments: dict) -> str:
    """One call as the model writes it: the block the tool-call grammar admits (compact JSON, ``name`` first).

    Used for calls in a prompt's history (the fallback) and in training data (``slmkit sft``,
    ``slmkit gen-data --tools``), so what a model is taught is what constrained decoding lets it write.
    """
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))
    return f"{OPEN}\n{body}\n{CLOSE}"


def fallback_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` as plain ``{role, content}`` turns for a template without tool support: calls as
    :func:`format_call` blocks, ``tool`` results as user turns in ``<tool_response>``, the functions
    in a system message (:data:`FALLBACK_SYSTEM`)."""
    msgs = []
    for m in messages:
        if "tool_calls" in m:
            text = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            msgs.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text})
        elif m["role"] == "tool":
            msgs.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            msgs.append({"role": m["role"], "content": m["content"]})
    if tools:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        sysmsg = FALLBACK_SYSTEM.format(tools=listing)
        if msgs and msgs[0]["role"] in ("system", "developer"):
            msgs[0] = {"role": msgs[0]["role"], "content": msgs[0]["content"] + "\n\n" + sysmsg}
        else:
            msgs.insert(0, {"role": "system", "content": sysmsg})
    return msgs


def render(tokenizer, messages: list[dict], tools: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt: the template's own tool support when it has one, else :data:`FALLBACK_SYSTEM` and text.

    ``add_generation_prompt=False`` renders a finished conversation (training data: ``slmkit sft``
    finds each assistant turn by rendering the conversation up to it with and without it).
    """
    from slmkit.backends.hf import render_prompt

    history = any("tool_calls" in m or m["role"] == "tool" for m in messages)
    if (tools or history) and template_knows_tools(tokenizer):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    msgs = fallback_messages(messages, tools) if (tools or history) else messages
    if add_generation_prompt or not getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, msgs)  # (without a chat template: its refusal)
    return tokenizer.apply_chat_template(msgs, tokenize=False)


# --------------------------------------------------------------------------- the output


class CallStream:
    """Generated text -> OpenAI chat deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``.

    Text that begins (after blanks) with ``<tool_call>`` is calls: each call's id and name go out as
    soon as its name is complete, then its arguments as they grow. Anything else is content.
    """

    def __init__(self):
        self.buf = ""
        self.mode: str | None = None  # None (undecided), "content", "calls"
        self.calls: list[dict] = []  # {id, name, sent (argument characters sent), args (complete text or None)}

    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.mode = "calls"
            elif OPEN.startswith(head):
                return []  # still undecided (blank, or a prefix of the tag)
            else:
                self.mode = "content"
                return [{"content": self.buf}]
        if self.mode == "content":
            return [{"content": piece}] if piece else []
        return self._call_deltas()

    def _call_deltas(self) -> list[dict]:
        out = []
        for i, m in enumerate(_HEAD.finditer(self.buf)):
            if i == len(self.calls):
                try:
                    name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    name = m.group(1)
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "sent": 0, "args": None})
                out.append({"tool_calls": [{"index": i, "id": self.calls[i]["id"], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            call = self.calls[i]
            try:
                _, end = json.JSONDecoder().raw_decode(self.buf, m.end())
                args = call["args"] = self.buf[m.end() : end]
            except ValueError:  # still growing: everything after the head is arguments so far
                args = self.buf[m.end() :]
            if len(args) > call["sent"]:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": args[call["sent"] :]}}]})
                call["sent"] = len(args)
        return out

    def finish(self) -> list[dict]:
        """Flush an undecided text as content (e.g. a lone ``<tool_`` cut by the budget)."""
        if self.mode is None and self.buf:
            self.mode = "content"
            return [{"content": self.buf}]
        return []

    def message(self) -> dict:
        """The whole assistant message: complete calls as ``tool_calls`` (content None), else the text as content."""
        done = [c for c in self.calls if c["args"] is not None]
        if self.mode != "calls" or not done:
            return {"role": "assistant", "content": self.buf}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}} for c in done]}


def parse_reply(text: str) -> dict:
    """A whole generated reply as an OpenAI assistant message (:meth:`CallStream.message`): complete
    ``<tool_call>`` blocks as ``tool_calls`` (arguments as JSON text), anything else as content."""
    calls = CallStream()
    calls.feed(text)
    calls.finish()
    return calls.message()


def delta_chunk(cid: str, created: int, model: str, delta: dict, first: bool, finish: str | None = None) -> dict:
    """A ``chat.completion.chunk`` carrying ``delta`` (the first one also carries the assistant role)."""
    d = {"role": "assistant", **delta} if first else delta
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

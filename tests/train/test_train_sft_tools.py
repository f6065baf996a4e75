"""SFT on tool-use conversations (issue 22): rendered as the server renders them, loss on the assistant's
calls and answers only, bad rows refused naming file and line."""

from __future__ import annotations

import copy
import json

import pytest

from slmkit.cli import main
from slmkit.errors import DataError
from slmkit.runtime import tools as tl
from slmkit.train.records import read_sft
from slmkit.train.sft import tokenize_chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1}},
                                        "required": ["minutes"]}}}
ROW = {"tools": [WEATHER, TIMER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, in C?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "It is 18 C in Paris."},
    {"role": "user", "content": "Set a timer for 5 minutes."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "set_timer", "arguments": {"minutes": 5}}}]},
]}
# what the assistant writes in each turn, end-of-turn marker included (ChatML)
CALL1 = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name":"set_timer","arguments":{"minutes":5}}\n</tool_call>'
WANT = [CALL1 + "<|im_end|>\n", "It is 18 C in Paris.<|im_end|>\n", CALL2 + "<|im_end|>\n"]

# a ChatML template with its own tool support (Qwen2.5 / Hermes style, cut down)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _runs(row) -> list[list[int]]:
    """The labelled tokens in maximal runs (each run one assistant turn)."""
    runs, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        assert lab in (-100, t)
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


def _write(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fallback_labels_exactly_the_assistant_calls_and_answers(tiny_tok, tmp_path):
    (conv,) = read_sft(_write(tmp_path / "t.jsonl", ROW))
    assert conv["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    row = tokenize_chat(tiny_tok, conv)
    assert [tiny_tok.decode(r) for r in _runs(row)] == WANT
    # the whole sequence is what the server would render: its fallback system prompt, tool results as user turns
    text = tiny_tok.decode(row["input_ids"])
    assert text == tl.render(tiny_tok, conv["messages"], conv["tools"], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call functions") and '"name": "set_timer"' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 18}\n</tool_response><|im_end|>" in text
    # the prompt the server builds for the first turn is exactly the unlabelled text before it
    first = tl.render(tiny_tok, conv["messages"][:2], conv["tools"])
    n = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
    assert tiny_tok.decode(row["input_ids"][:n]) == first


def test_template_with_tools_labels_exactly_the_assistant_turns(tiny_tok, tmp_path):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = TOOL_TEMPLATE
    assert tl.template_knows_tools(tok)
    (conv,) = read_sft(_write(tmp_path / "t.jsonl", ROW))
    row = tokenize_chat(tok, conv)
    # the template writes calls with its own JSON (tojson: spaces after separators)
    want = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n',
            "It is 18 C in Paris.<|im_end|>\n",
            '<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call><|im_end|>\n']
    assert [tok.decode(r) for r in _runs(row)] == want
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n")


def test_format_call_is_what_the_call_grammar_admits(tiny_tok):
    """Training data writes calls as the constrained decoder must write them."""
    import llguidance as llg

    from slmkit.runtime.constrain import compile_grammar, llg_tokenizer

    tools = tl.tools_of({"tools": [WEATHER, TIMER]})
    lltok = llg_tokenizer(tiny_tok, len(tiny_tok), [tiny_tok.eos_token_id])
    for choice in ("required", "get_weather"):
        m = llg.LLMatcher(lltok, compile_grammar(tl.call_grammar(tools, choice, False)), log_level=0)
        ids = lltok.tokenize_str(CALL1)
        assert m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()
    m = llg.LLMatcher(lltok, compile_grammar(tl.call_grammar(tools, "required", False)), log_level=0)
    spaced = lltok.tokenize_str(CALL1.replace('":', '": '))
    assert m.validate_tokens(spaced) < len(spaced)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     r"t.jsonl:2: messages\[2\].tool_calls: arguments of 'get_weather' are not valid JSON"),
    (lambda r: r["messages"].insert(1, {"role": "tool", "content": "42"}),
     r"t.jsonl:2: messages\[1\] is a tool result without a preceding tool call"),
    (lambda r: r["messages"][3].update(tool_call_id="nope"),
     r"t.jsonl:2: messages\[3\].tool_call_id 'nope' answers no call"),
    (lambda r: r["messages"][1].update(role="robot"),
     r"t.jsonl:2: messages\[1\].role is 'robot'; expected one of"),
    (lambda r: r["messages"][6]["tool_calls"][0]["function"].update(name="launch"),
     r"t.jsonl:2: messages\[6\] calls 'launch', which 'tools' does not offer"),
    (lambda r: r["messages"][6]["tool_calls"][0]["function"].update(arguments={"minutes": 0}),
     r"t.jsonl:2: messages\[6\]: arguments of 'set_timer' do not match its parameters at minutes"),
    (lambda r: r["tools"].append({"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}}),
     r"t.jsonl:2: tools\[2\].function.parameters \(x\) is not a valid JSON schema"),
])
def test_bad_tool_rows_name_file_and_line(tmp_path, mutate, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = copy.deepcopy(ROW)
    mutate(bad)
    with pytest.raises(DataError, match=message):
        read_sft(_write(tmp_path / "t.jsonl", good, bad))


def test_cli_sft_trains_on_tool_rows_and_refuses_bad_ones(capsys, tiny_dir, tmp_path):
    data = _write(tmp_path / "t.jsonl", ROW, ROW)
    code = main(["sft", str(tiny_dir), "--data", str(data), "--lora", "--max-steps", "1", "--max-length", "1024",
                 "--output", str(tmp_path / "ad"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["examples"] == 2
    bad = copy.deepcopy(ROW)
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{oops"
    _write(data, ROW, bad)
    code = main(["sft", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "t.jsonl:2: messages[2].tool_calls: arguments of 'get_weather' are not valid JSON" in err
    assert "Traceback" not in err

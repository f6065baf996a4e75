"""gen-data --tools (issue 22): a constrained call per prompt, rows valid against the tools' schemas and
readable by sft; resumable; bad tools files and choices exit 2."""

from __future__ import annotations

import json

import jsonschema
import pytest

from slmkit.backends.hf import HFBackend
from slmkit.cli import main
from slmkit.data.synth import PromptItem
from slmkit.data.toolsynth import ToolSynthConfig, generate_tool_dataset, read_tools
from slmkit.errors import ConfigError, DataError
from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model
from slmkit.train.records import read_sft
from slmkit.train.sft import tokenize_chat

FUNCS = [
    {"name": "get_weather", "description": "Weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 99}},
                                         "required": ["minutes"], "additionalProperties": False}},
]
PARAMS = {f["name"]: f["parameters"] for f in FUNCS}
PROMPTS = ["Weather in Paris?", "Set a timer for 5 minutes.", "Is it raining in Oslo?", "Timer for ten minutes"]


@pytest.fixture(scope="module")
def lively(tiny_tok, tmp_path_factory):
    """A random tiny model whose outputs vary (larger init), with room for the fallback tool prompt."""
    model = tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2, max_position_embeddings=2048), seed=1)
    return model, tiny_tok, save_tiny(model, tiny_tok, tmp_path_factory.mktemp("lively") / "m")


def _files(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(FUNCS))
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path / "tools.json", tmp_path / "p.txt"


def _check_rows(path, choice=None):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        assert list(r)[0] == "id" and [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert [t["function"]["name"] for t in r["tools"]] == ["get_weather", "set_timer"]
        (call,) = r["messages"][1]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_") and r["messages"][1]["content"] is None
        name = call["function"]["name"]
        assert choice in (None, name)
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])
    return rows


def test_rows_validate_and_train(lively, tmp_path):
    model, tok, _ = lively
    tools = read_tools(_files(tmp_path)[0])
    items = [PromptItem(f"p{i}", [{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)]
    out = tmp_path / "calls.jsonl"
    rep = generate_tool_dataset(HFBackend(model, tok), items, tools, out, ToolSynthConfig(max_new_tokens=128, temperature=0.9, seed=3))
    assert rep.accepted == len(PROMPTS) and rep.generated == len(PROMPTS) and not rep.rejected
    rows = _check_rows(out)
    # the rows are sft data: read back through sft's checks, the calls (and only they) are labelled
    convs = read_sft(out)
    for row, conv in zip(rows, convs):
        ids_labels = tokenize_chat(tok, conv)
        labelled = tok.decode([t for t in ids_labels["labels"] if t != -100])
        call = row["messages"][1]["tool_calls"][0]["function"]
        from slmkit.runtime.tools import format_call

        assert labelled == format_call(call["name"], json.loads(call["arguments"])) + "<|im_end|>\n"
    # a rerun skips what is done; a named function forces that function
    again = generate_tool_dataset(HFBackend(model, tok), items, tools, out, ToolSynthConfig(max_new_tokens=128))
    assert again.generated == 0 and again.skipped_done == len(PROMPTS)
    named = tmp_path / "timer.jsonl"
    generate_tool_dataset(HFBackend(model, tok), items, tools, named, ToolSynthConfig(tool_choice="set_timer", max_new_tokens=128))
    assert len(_check_rows(named, "set_timer")) == len(PROMPTS)


def test_cli_gen_data_tools(capsys, lively, tmp_path):
    _, _, mdir = lively
    tools, prompts = _files(tmp_path)
    out = tmp_path / "o.jsonl"
    code = main(["gen-data", str(mdir), "--prompts", str(prompts), "--tools", str(tools), "--tool-choice", "get_weather",
                 "--max-new-tokens", "128", "--output", str(out), "--json"])
    res, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(res)["accepted"] == len(PROMPTS)
    _check_rows(out, "get_weather")
    for args, message in [
        (["--tools", str(tools), "--tool-choice", "launch"], "tool choice 'launch' is neither 'required' nor an offered function"),
        (["--tools", str(tmp_path / "nope.json")], "does not exist"),
        (["--tool-choice", "set_timer"], "--tool-choice and --parallel-calls need --tools FILE"),
        (["--tools", str(prompts)], "p.txt: not valid JSON"),
    ]:
        code = main(["gen-data", str(mdir), "--prompts", str(prompts), "--output", str(tmp_path / "x.jsonl"), *args])
        _, err = capsys.readouterr()
        assert code == 2 and message in err and "Traceback" not in err, err


def test_bad_tools_files(tmp_path):
    f = tmp_path / "t.json"
    for value, message in [({"name": "x"}, "must be a non-empty JSON list"), ([], "must be a non-empty JSON list"),
                           ([{"name": "bad name"}], r"tools\[0\].function.name must match"),
                           ([FUNCS[0], FUNCS[0]], "offered twice"),
                           ([{"name": "x", "parameters": {"type": 3}}], "is not a valid JSON schema")]:
        f.write_text(json.dumps(value))
        with pytest.raises(DataError, match=message):
            read_tools(f)
    # OpenAI tool objects are accepted as they are
    f.write_text(json.dumps([{"type": "function", "function": FUNCS[1]}]))
    assert read_tools(f)[0]["function"]["name"] == "set_timer"


class _Remote:
    """A backend without a tokenizer (as an OpenAI-compatible endpoint is)."""

    name = "http://example.invalid"

    def generate(self, prompts, params):
        raise AssertionError("must not be called")


def test_teacher_must_be_local(tmp_path):
    (tools_file, _) = _files(tmp_path)
    with pytest.raises(ConfigError, match="needs a local model"):
        generate_tool_dataset(_Remote(), [PromptItem("a", [{"role": "user", "content": "hi"}])],
                              read_tools(tools_file), tmp_path / "o.jsonl")

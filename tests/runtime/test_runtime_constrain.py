"""Constrained decoding (issue 22): random tiny models under a JSON schema, regex or grammar still give valid output."""

import json
import re

import jsonschema
import pytest
import torch

from slmkit.backends import GenParams, HFBackend
from slmkit.runtime.backend import FastBackend
from slmkit.runtime.constrain import Constraint, ConstraintError, TokenMask, llg_tokenizer

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "pos": {"type": "object", "properties": {"x": {"type": "integer"}, "ok": {"type": "boolean"}},
                    "required": ["x", "ok"], "additionalProperties": False},
        },
        "required": ["name", "pos"], "additionalProperties": False,
    },
    "enum_array": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]},
                       "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 4}},
        "required": ["colour", "tags"], "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                       "note": {"type": "string"}},
        "required": ["age", "score"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array", "minItems": 2,
        "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0}, "v": {"type": ["string", "null"]}},
                  "required": ["id", "v"], "additionalProperties": False},
    },
}
PROMPTS = ["The cat sees", "a dog", [{"role": "user", "content": "Give me JSON"}]]


def _backends(lively):
    model, tok = lively
    return {"hf": HFBackend(model, tok), "fast": FastBackend(model, tok)}


@pytest.fixture(scope="module")
def backends(lively):
    return _backends(lively)


@pytest.mark.parametrize("path", ["hf", "fast"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_constrained_output_parses_and_validates(backends, path, name):
    schema = SCHEMAS[name]
    c = Constraint.json_schema(schema)
    for temperature in (0.0, 1.0):
        outs = backends[path].generate(PROMPTS, GenParams(max_new_tokens=96, temperature=temperature, seed=5, constraint=c))
        for o in outs:
            assert o.finish_reason == "stop", o
            jsonschema.validate(json.loads(o.text), schema)


def test_unconstrained_random_model_is_not_json(backends):
    """The control: without the constraint the same model does not write valid JSON."""
    outs = backends["fast"].generate(PROMPTS, GenParams(max_new_tokens=48))
    for o in outs:
        with pytest.raises(ValueError):
            json.loads(o.text)


def test_fast_and_transformers_paths_agree_greedy(backends):
    c = Constraint.json_schema(SCHEMAS["nested"])
    p = GenParams(max_new_tokens=80, constraint=c)
    assert backends["hf"].generate(PROMPTS, p)[0].text == backends["fast"].generate(PROMPTS, p)[0].text


def test_close_out_finishes_within_a_small_budget(backends):
    """An unbounded integer would run for ever under a random model: the close-out ends the object in time."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}, "required": ["n", "s"],
              "additionalProperties": False}
    for path in ("hf", "fast"):
        for budget in (16, 24, 40):
            o = backends[path].generate(PROMPTS[:1], GenParams(max_new_tokens=budget, constraint=Constraint.json_schema(schema)))[0]
            jsonschema.validate(json.loads(o.text), schema)
            assert o.tokens <= budget


def test_regex_and_grammar(backends):
    for path, b in backends.items():
        o = b.generate(PROMPTS[:2], GenParams(max_new_tokens=20, temperature=1.0, seed=1,
                                             constraint=Constraint.regex(r"[0-9]{3}-[a-z]{2,4}")))
        assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", x.text) for x in o), (path, o)
        lark = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z ]{1,20}/'
        o = b.generate(PROMPTS, GenParams(max_new_tokens=40, constraint=Constraint.grammar(lark)))
        assert all(re.fullmatch(r"(yes|no) because [a-z ]{1,20}", x.text) for x in o), (path, o)
        gbnf = 'root ::= "(" [0-9]+ ")"'  # llama.cpp's GBNF is accepted too
        o = b.generate(PROMPTS[:1], GenParams(max_new_tokens=12, constraint=Constraint.grammar(gbnf)))[0]
        assert re.fullmatch(r"\([0-9]+\)", o.text), o


@pytest.mark.parametrize("schema, words", [
    ({"type": 12}, "not a valid JSON schema"),
    ({"type": "object", "required": "a"}, "not a valid JSON schema"),
    ("{not json", "not valid JSON"),
])
def test_invalid_schema_is_refused_when_built(schema, words):
    with pytest.raises(ConstraintError, match=words):
        Constraint.json_schema(schema)


@pytest.mark.parametrize("c, words", [
    (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 2}), "minimum"),
    (Constraint.json_schema({"type": "string", "enum": []}), "cannot be used"),
    (Constraint.regex("("), "invalid regex"),
    (Constraint.grammar("start: x\nx: x"), "admits no output"),
    (Constraint.grammar("start: ( "), "cannot be used"),
])
def test_unusable_constraints_fail_clearly_not_hang(backends, c, words):
    for b in backends.values():
        with pytest.raises(ConstraintError, match=words):
            b.generate(PROMPTS[:1], GenParams(max_new_tokens=8, constraint=c))


def test_dead_end_mid_output_is_an_error(lively):
    model, tok = lively
    m = TokenMask(llg_tokenizer(tok, model.config.vocab_size), Constraint.grammar('start: "ab" x\nx: x'))
    for t in tok("ab", add_special_tokens=False).input_ids:
        m.apply(torch.zeros(model.config.vocab_size))
        m.accept(t)
    with pytest.raises(ConstraintError, match="no continuation after"):
        m.apply(torch.zeros(model.config.vocab_size))


def test_cli_generate_json_schema(tmp_path, lively):
    from slmkit.cli import main
    from slmkit.models.tiny import save_tiny

    model, tok = lively
    d = save_tiny(model, tok, tmp_path / "m")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["enum_array"]))
    import contextlib
    import io

    for fast in ([], ["--fast"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["generate", str(d), "The cat", "--json-schema", str(schema), *fast, "--json", "--max-new-tokens", "64"])
        assert rc == 0
        out = json.loads(buf.getvalue())
        jsonschema.validate(json.loads(out["text"]), SCHEMAS["enum_array"])
        assert out["json"] == json.loads(out["text"])
    (tmp_path / "bad.json").write_text('{"type": "integer", "minimum": 3, "maximum": 1}')
    (tmp_path / "empty.lark").write_text("start: x\nx: x\n")
    for args in (["--json-schema", str(tmp_path / "bad.json")], ["--json-schema", str(tmp_path / "none.json")],
                 ["--grammar", str(tmp_path / "empty.lark"), "--fast"], ["--regex", "a", "--json-schema", str(schema)]):
        assert main(["generate", str(d), "x", *args]) == 2, args

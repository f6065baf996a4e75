"""Function-calling evaluation (issue 22): the generated set's splits, the scoring of known-right and
known-wrong replies, and constrained evaluation on a random tiny model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from slmkit.eval.toolcalls import TOOLS, ToolExample, evaluate, make_split, normalise, score_reply, sft_rows
from slmkit.runtime.tools import format_call
from slmkit.train.records import check_tool_conversation

GOLD = ToolExample("t", "Convert 40 EUR to USD.", "convert_currency", {"amount": 40, "from_currency": "EUR", "to_currency": "USD"},
                   ("set_timer", "convert_currency"))


def test_splits_are_deterministic_disjoint_and_valid():
    train, test = make_split("train", 60, seed=1), make_split("test", 40, seed=1)
    assert train == make_split("train", 60, seed=1) and train != make_split("train", 60, seed=2)
    assert not {e.request for e in train} & {e.request for e in test}
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    free = {"city", "to", "subject", "query", "artist", "text", "symbol", "pickup", "destination"}
    train_values = {(k, v) for e in train for k, v in e.arguments.items() if k in free}
    assert not train_values & {(k, v) for e in test for k, v in e.arguments.items() if k in free}
    for e in train + test:
        jsonschema.validate(e.arguments, params[e.name])
        assert len(e.tools) == 4 and e.name in e.tools
    assert {e.name for e in test} == set(params)  # every function is tested
    for row in sft_rows(train[:10]):  # gold rows are valid sft rows
        check_tool_conversation(row, "gold")


def test_scores_of_known_right_and_wrong_replies():
    right = score_reply(format_call("convert_currency", {"to_currency": "USD", "amount": 40.0, "from_currency": "EUR"}), GOLD)
    assert (right.valid, right.function, right.exact, right.args_right, right.args_total) == (True, True, True, 3, 3)
    # spaced JSON and text around the call still parse (free decoding)
    assert score_reply('<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 40, "from_currency": "EUR", '
                       '"to_currency": "USD"}}\n</tool_call>', GOLD).exact
    one_off = score_reply(format_call("convert_currency", {"amount": 41, "from_currency": "EUR", "to_currency": "USD"}), GOLD)
    assert (one_off.valid, one_off.function, one_off.exact, one_off.args_right) == (True, True, False, 2)
    extra = score_reply(format_call("convert_currency", {**GOLD.arguments, "note": "x"}), GOLD)
    assert (extra.valid, extra.exact, extra.args_right) == (False, False, 3)  # additionalProperties: false
    wrong_fn = score_reply(format_call("set_timer", {"minutes": 40}), GOLD)
    assert (wrong_fn.valid, wrong_fn.function, wrong_fn.exact, wrong_fn.args_right) == (True, False, False, 0)
    not_offered = score_reply(format_call("get_weather", {"city": "Oslo", "unit": "celsius"}), GOLD)
    assert not not_offered.valid and not not_offered.function
    text = score_reply("40 EUR is about 43 USD.", GOLD)
    assert (text.valid, text.function, text.exact, text.args_total, text.predicted) == (False, False, False, 3, None)
    assert normalise({"b": [1.0, {"y": 2, "x": True}], "a": "1"}) == {"a": "1", "b": [1, {"x": True, "y": 2}]}
    assert normalise(1) != normalise("1") and normalise(True) is True


class _Replay:
    """A backend that answers each prompt with a fixed reply (checks the aggregation, not a model)."""

    name = "replay"

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies = tokenizer, replies

    def generate(self, prompts, params):
        from slmkit.backends.base import Completion

        return [Completion(self.replies.pop(0), 1, "stop") for _ in prompts]


def test_evaluate_aggregates(tiny_tok):
    test = make_split("test", 4)
    replies = [format_call(test[0].name, test[0].arguments), "no idea",
               format_call(test[2].name, {**test[2].arguments, "minutes": 599}), format_call(test[3].name, test[3].arguments)]
    res = evaluate(_Replay(tiny_tok, list(replies)), test, constrained=False)
    assert (res.exact_accuracy, res.function_accuracy, res.valid) == (0.5, 0.75, 0.75)
    assert res.argument_accuracy == pytest.approx((2 + 0 + 0 + 2) / (2 + 3 + 1 + 2))
    assert res.exact_ci95[0] < 0.5 < res.exact_ci95[1] and res.samples[1]["reply"] == "no idea"


def test_constrained_decoding_always_yields_a_valid_call(tiny_tok):
    from slmkit.backends.hf import HFBackend
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    model = tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2, max_position_embeddings=2048), seed=1)
    test = make_split("test", 6)
    res = evaluate(HFBackend(model, tiny_tok), test, constrained=True, max_new_tokens=128)
    assert res.valid == 1.0
    for s in res.samples:
        call = json.loads(s["reply"].split("\n")[1])
        assert call["name"] in [t["function"]["name"] for t in TOOLS]

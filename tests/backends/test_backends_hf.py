"""HFBackend: batched generation (left padding) equals one prompt at a time; streaming equals generating."""

import pytest

from slmkit.backends import GenParams, HFBackend
from slmkit.backends.stream import TokenText, generate_streaming, releasable
from slmkit.models.tiny import tiny_llama_config, tiny_model

PROMPTS = [
    "The cat sees",
    "A dog",
    "My friend likes green apples and the old book. It is 12 steps away",
    "",
    [{"role": "user", "content": "Where is paris?"}],
    "x",
    "the river is near the house. It is",
]


@pytest.fixture(scope="module")
def lively_pair(tiny_tok):
    """A tiny model whose greedy text does not collapse to one repeated token (init std 0.2)."""
    return tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=5), tiny_tok


@pytest.mark.parametrize("params", [
    GenParams(max_new_tokens=16, logprobs=True),
    GenParams(max_new_tokens=16, stop=("e",)),
    GenParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, logprobs=True),
], ids=["greedy", "stop", "seeded-sampling"])
def test_batched_generation_equals_one_at_a_time(lively_pair, params):
    model, tok = lively_pair
    one = HFBackend(model, tok, batch_size=1).generate(PROMPTS, params)
    many = HFBackend(model, tok, batch_size=8).generate(PROMPTS, params)
    assert [(c.text, c.tokens, c.finish_reason) for c in many] == [(c.text, c.tokens, c.finish_reason) for c in one]
    assert len({c.text for c in one}) > 3  # the prompts really got different answers
    if params.stop:
        assert any(c.finish_reason == "stop" for c in one) and not any("e" in c.text for c in one)
    if params.logprobs:
        for a, b in zip(one, many):
            assert len(a.logprobs) == a.tokens and b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_seeded_sample_does_not_depend_on_batchmates(lively_pair):
    model, tok = lively_pair
    be = HFBackend(model, tok, batch_size=8)
    p = GenParams(max_new_tokens=12, temperature=1.0, seed=11)
    alone = be.generate(["The cat sees"], p)[0].text
    assert be.generate(["The cat sees", "A dog"], p)[0].text == alone
    # item i uses seed + i: the same prompt at index 1 equals it alone with seed + 1
    second = be.generate(["A dog", "The cat sees"], p)[1].text
    assert second == be.generate(["The cat sees"], GenParams(max_new_tokens=12, temperature=1.0, seed=12))[0].text


@pytest.mark.parametrize("stop", [(), ("e",), ("s ", "the")])
def test_hf_stream_pieces_concatenate_to_the_completion(lively_pair, stop):
    model, tok = lively_pair
    be = HFBackend(model, tok)
    params = GenParams(max_new_tokens=24, stop=stop)
    for prompt in PROMPTS[:3]:
        pieces: list[str] = []
        c = be.stream(prompt, params, pieces.append)
        assert "".join(pieces) == c.text == be.generate([prompt], params)[0].text
        assert not any(s in "".join(pieces) for s in stop)
    assert len(pieces) > 1


def test_stream_stops_when_asked(lively_pair):
    model, tok = lively_pair
    calls = []
    c = HFBackend(model, tok).stream("The cat sees", GenParams(max_new_tokens=40), lambda s: calls.append(s) or len(calls) >= 2)
    assert len(calls) == 2 and c.tokens < 40


def test_generate_streaming_falls_back_to_one_piece():
    from slmkit.backends.base import Completion

    class Plain:
        name = "plain"

        def generate(self, prompts, params):
            return [Completion("whole answer", 2, "stop")]

    pieces = []
    assert generate_streaming(Plain(), "q", GenParams(), pieces.append).text == "whole answer"
    assert pieces == ["whole answer"]


def test_releasable_holds_back_stop_prefixes_and_partial_characters():
    assert releasable("hello wor", 0, ["world"], final=False) == ("hello wor", 5, False)
    assert releasable("hello world!", 0, ["world"], final=False) == ("hello ", 6, True)
    assert releasable("ab\ufffd", 0, [], final=False) == ("ab\ufffd", 2, False)
    assert releasable("ab\ufffd", 0, [], final=True)[1] == 3
    assert releasable("abc", 3, ["zz"], final=False)[1] == 3  # never goes backwards


def test_token_text_ignores_tokens_after_eos(tiny_tok):
    got = []
    tt = TokenText(tiny_tok, (), got.append, eos={tiny_tok.eos_token_id})
    ids = tiny_tok("The cat sees").input_ids
    assert tt.push(ids[:1]) is False
    assert tt.push([*ids[1:], tiny_tok.eos_token_id, *ids]) is True
    tt.close()
    assert "".join(got) == "The cat sees"

"""RAG answers: extractive spans by the model's own scores, fallback and abstention, the filter, training rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from slmkit.backends import HFBackend
from slmkit.backends.base import TokenScores
from slmkit.collab.retrieval import FilterConfig
from slmkit.errors import ConfigError, DataError
from slmkit.rag.answer import RAGConfig, answer, locate
from slmkit.rag.extract import ExtractConfig, best_span, candidates, decode_span, end_marker, extract_prompt, words
from slmkit.rag.index import Hit

SOURCES = ["Zebras of the Karoo have faint stripes.", "The lamp room (built 1893) was painted orange. It faces west."]


@pytest.fixture(scope="module")
def backend(tiny_tok):
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    return HFBackend(tiny_model(tiny_llama_config(tiny_tok, initializer_range=0.2), seed=3), tiny_tok)


def test_words_and_candidates_stay_in_sentences_and_close_brackets():
    text = SOURCES[1]
    ws = words(text)
    assert [text[a:b] for a, b, _ in ws][:5] == ["The", "lamp", "room", "built", "1893"]
    assert [e for _, _, e in ws][7] is True  # "orange." ends a sentence
    starts = {(1, 2)}  # from "room"
    spans = [text[a:b] for _, a, b in candidates(["x", text], starts, max_words=8)]
    assert spans[:3] == ["room", "room (built", "room (built 1893)"]  # the bracket it opened is closed
    assert spans[-1] == "room (built 1893) was painted orange" and not any("It" in s for s in spans)
    assert len(candidates([text, text], {(0, 0), (1, 0)}, 2)) == 2  # the same text from two sources: once


def test_best_span_is_the_models_most_likely_complete_answer(backend):
    """The chosen span maximises log p(span + END | prompt); checked against plain ``score`` on every candidate."""
    cfg = ExtractConfig(max_words=3, starts=50)
    span = best_span(backend, "Which zebras have faint stripes?", SOURCES, cfg)
    assert SOURCES[span.source][span.start: span.end] == span.text
    prompt, chat = extract_prompt(backend.tokenizer, "Which zebras have faint stripes?", SOURCES, cfg)
    end = end_marker(backend.tokenizer, chat)
    assert chat and end == "<|im_end|>"
    all_starts = {(si, wi) for si, s in enumerate(SOURCES) for wi in range(len(words(s)))}
    texts = [SOURCES[si][a:b] for si, a, b in candidates(SOURCES, all_starts, 3)]
    totals = [s.total for s in backend.score([t + end for t in texts], [prompt] * len(texts))]
    assert span.text == texts[max(range(len(texts)), key=lambda i: totals[i])]
    assert span.logprob == pytest.approx(max(totals), abs=1e-3)


def test_extractive_answers_carry_spans_and_abstain_when_nothing_supports(backend):
    hits = [Hit(f"s{i}@0", f"s{i}", t, 0.5) for i, t in enumerate(SOURCES)]

    class Fixed:  # index stand-in: answer() only needs retrieve() to return these hits
        pass

    import slmkit.rag.answer as rag_answer

    real = rag_answer.retrieve
    rag_answer.retrieve = lambda index, emb, qs, k, *a: [list(hits) for _ in qs]
    try:
        cfg = RAGConfig(k=2, max_new_tokens=4, extractive=ExtractConfig(min_score=float("-inf")))
        (a,) = answer(backend, Fixed(), None, ["Which zebras have faint stripes?"], cfg)
        src = {h.id: h.text for h in hits}[a.span["id"]]
        assert a.mode == "extractive" and a.answer == src[a.span["start"]: a.span["end"]]
        assert a.candidate["text"] == a.answer and a.prompt_tokens > 0 and a.cited == [a.span["id"]]
        d = a.to_dict()
        assert set(d) >= {"question", "answer", "sources", "span"} and set(d["span"]) == {"id", "start", "end"}
        strict = RAGConfig(k=2, max_new_tokens=4, extractive=ExtractConfig(min_score=float("inf")))
        (b,) = answer(backend, Fixed(), None, ["Which zebras have faint stripes?"], strict)
        assert b.answer is None and b.mode == "abstained" and "no retrieved passage supports an answer" in b.reason
        assert b.to_dict()["answer"] is None and b.span is None
    finally:
        rag_answer.retrieve = real
    with pytest.raises(ConfigError, match="need retrieved passages"):
        RAGConfig(k=0, extractive=ExtractConfig())


def test_locate_finds_a_generated_answer_in_the_sources():
    hits = [Hit("a@0", "a", SOURCES[0], 1.0), Hit("b@0", "b", SOURCES[1], 0.9)]
    where = locate("It was painted orange [2].", hits)
    assert where["id"] == "b@0" and "painted orange" in SOURCES[1][where["start"]: where["end"]]
    assert locate("purple elephants", hits) is None


class YesNo:
    """A small model that says Yes only to passages containing ``word``."""

    name = "yes-no"

    def __init__(self, word):
        self.word = word

    def score(self, texts, contexts=None):
        return [TokenScores([t], [-0.1 if (self.word in c) == (t == "Yes") else -4.0]) for t, c in zip(texts, contexts)]


def test_filter_drops_passages_before_the_answering_model_reads_them(backend):
    import slmkit.rag.answer as rag_answer

    hits = [Hit("a@0", "a", SOURCES[0], 1.0), Hit("b@0", "b", SOURCES[1], 0.9)]
    real = rag_answer.retrieve
    rag_answer.retrieve = lambda index, emb, qs, k, *a: [list(hits) for _ in qs]
    try:
        cfg = RAGConfig(k=2, max_new_tokens=3)
        (plain,) = answer(backend, object(), None, ["What colour is the lamp room?"], cfg)
        (kept,) = answer(backend, object(), None, ["What colour is the lamp room?"],
                         RAGConfig(k=2, max_new_tokens=3, filter=FilterConfig()), small=YesNo("orange"))
    finally:
        rag_answer.retrieve = real
    assert [h.id for h in kept.sources] == ["b@0"] and kept.retrieved == 2
    assert kept.prompt_tokens < plain.prompt_tokens and kept.prompt_chars < plain.prompt_chars
    with pytest.raises(ConfigError, match="needs a small model"):
        answer(backend, object(), None, ["q"], RAGConfig(k=2, filter=FilterConfig()))


def test_rag_training_rows_put_the_gold_among_distractors(tmp_path):
    from slmkit.rag.embed import Embedder
    from slmkit.rag.index import VectorIndex, build_index
    from slmkit.rag.retrieve import RetrieverConfig
    from slmkit.rag.train import RAGTrainConfig, rag_conversations, read_qa

    docs = tmp_path / "p.jsonl"
    texts = ["Zebras of the Karoo have faint stripes.", "Bees dance to show where flowers are.",
             "The lamp room was painted orange.", "Bread needs a starter."]
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    build_index([docs], tmp_path / "idx", Embedder.load(), retriever=RetrieverConfig(method="bm25"))
    index = VectorIndex.open(tmp_path / "idx")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What colour was the lamp room?", "answer": "orange", "passage_id": 2}) + "\n"
                  + json.dumps({"question": "Which zebras?", "answer": "of the Karoo"}) + "\n"
                  + json.dumps({"question": "Who?", "answer": "nobody at all", "passage_id": 1}) + "\n")
    built = rag_conversations(read_qa(qa), index, None, RAGTrainConfig(k=3, search=4, seed=1))
    assert len(built.conversations) == 2 and built.skipped == 1
    for conv, gold in zip(built.conversations, ("The lamp room was painted orange.", "Zebras of the Karoo")):
        user, reply = conv[-2]["content"], conv[-1]
        n = int(reply["content"].rsplit("[", 1)[1].rstrip("]"))
        assert reply["role"] == "assistant" and user.count("\n[") + user.startswith("[") >= 2
        assert user.split(f"[{n}] ", 1)[1].startswith(gold)
    qa.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:1: missing field 'answer'"):
        read_qa(qa)


class _Scripted(torch.nn.Module):
    """A stand-in causal LM whose next-token logits follow ``plan[step]`` (token ids, most preferred first)."""

    def __init__(self, vocab: int, plan: list[list[int]]):
        super().__init__()
        self.vocab, self.plan, self.step = vocab, plan, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # decode_span reads the device from the parameters
        self.prompts = []

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=1):
        if cache is None:
            self.step = 0
            self.prompts.append(input_ids[0].tolist())
        logits = torch.zeros(1, 1, self.vocab)
        for rank, t in enumerate(self.plan[min(self.step, len(self.plan) - 1)]):
            logits[0, 0, t] = 20.0 - rank
        self.step += 1
        return SimpleNamespace(logits=logits, cache="kept")


def test_decode_span_copies_a_source_run_and_follows_the_models_preferences(tiny_tok):
    """Constrained decoding: the model's favourite token is skipped when it would not continue a copy of a
    source; the first token may be a word's bare form ("f" for the source's " f"); the span ends where the
    model prefers the end of turn; offsets point at the copied text."""
    tok = tiny_tok
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    outside = next(t for t in range(len(tok)) if t not in set(ids(SOURCES[0]) + ids(SOURCES[1])) and t > 10)
    faint, stripes, orange, end = ids("faint"), ids(" stripes"), ids(" orange"), ids("<|im_end|>")[0]
    plan = [[outside, t] for t in faint] + [[outside, orange[0], stripes[0]]] + [[outside, t] for t in stripes[1:]]
    plan += [[outside, end]]
    model = _Scripted(len(tok), plan)
    backend = SimpleNamespace(tokenizer=tok, model=model, score_choices=None)
    span = decode_span(backend, "Which zebras have faint stripes?", SOURCES, ExtractConfig(method="decode"))
    assert (span.source, span.text) == (0, "faint stripes") and SOURCES[0][span.start: span.end] == "faint stripes"
    assert span.tokens == len(faint) + len(stripes) + 1
    # log-probabilities under the unconstrained logits: 20 for the top token, 19 for the second, ...
    logz = float(torch.logsumexp(torch.tensor([20.0, 19.0, 18.0] + [0.0] * (len(tok) - 3)), 0))
    logz2 = float(torch.logsumexp(torch.tensor([20.0, 19.0] + [0.0] * (len(tok) - 2)), 0))
    assert span.logprob == pytest.approx((span.tokens - 1) * (19.0 - logz2) + (18.0 - logz), abs=1e-3)
    # the prompt is the one generated answers (and sft --rag conversations) use
    assert tok.decode(model.prompts[0]).count("Answer the question using the numbered sources") == 1
    # a span may not run past max_tokens: the end is then forced
    short = decode_span(backend, "q", SOURCES, ExtractConfig(method="decode", max_tokens=2))
    assert short.tokens == 3 and short.text == SOURCES[0][short.start: short.end] and "faint".startswith(short.text)


def test_extractive_method_is_chosen_by_name(backend):
    hits = [Hit(f"s{i}@0", f"s{i}", t, 0.5) for i, t in enumerate(SOURCES)]
    import slmkit.rag.answer as rag_answer

    real = rag_answer.retrieve
    rag_answer.retrieve = lambda index, emb, qs, k, *a: [list(hits) for _ in qs]
    try:
        cfg = RAGConfig(k=2, max_new_tokens=4, extractive=ExtractConfig(method="decode", min_score=float("-inf"), max_tokens=4))
        (a,) = answer(backend, object(), None, ["Which zebras have faint stripes?"], cfg)
    finally:
        rag_answer.retrieve = real
    src = {h.id: h.text for h in hits}[a.span["id"]]
    assert a.mode == "extractive" and a.answer and a.answer == src[a.span["start"]: a.span["end"]]
    with pytest.raises(ConfigError, match="unknown extractive method 'decoder'.*decode, decode-each, score"):
        ExtractConfig(method="decoder")


def test_cloze_rows_blank_one_phrase_of_a_passage_sentence():
    from slmkit.rag.train import cloze_rows

    text = ("The lamp room (built 1893) was painted bright orange by the keepers. It faces west over the bay. "
            "Zebras of the Karoo have faint stripes on their legs and flanks.")
    rows = cloze_rows([("p", text), ("q", "Too short.")], per_chunk=5, seed=1)
    assert rows == cloze_rows([("p", text), ("q", "Too short.")], per_chunk=5, seed=1)  # seeded
    assert len(rows) == 2 and {r["passage_id"] for r in rows} == {"p"}  # the 6-word sentence is too short
    for r in rows:
        assert r["question"].count("__") == 1 and r["answer"] in text
        assert r["question"].replace("__", r["answer"]) == r["context"] and r["context"] in text  # the phrase put back
        assert not set("()") & set(r["answer"]) and r["answer"].split()[0].lower() not in {"the", "of", "a"}
    assert {r["answer"] for r in rows} <= {"1893", "Karoo"}  # names and numbers first (not a sentence's first word)
    (city,) = cloze_rows([("c", "New York City is the largest city of the state, by far.")], per_chunk=1)
    assert city["answer"] == "New York City"  # a name may open the sentence
    with pytest.raises(ConfigError):
        cloze_rows([("p", text)], per_chunk=0)


def test_decode_each_reads_sources_alone_and_keeps_the_best_supported_span(tiny_tok):
    from slmkit.rag.extract import decode_each_span

    tok = tiny_tok
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    plan = [[t] for t in ids("faint") + ids(" stripes")] + [[ids("<|im_end|>")[0]]]
    model = _Scripted(len(tok), plan)
    backend = SimpleNamespace(tokenizer=tok, model=model, score_choices=None)
    cfg = ExtractConfig(method="decode-each")
    span = decode_each_span(backend, "Which zebras have faint stripes?", SOURCES[::-1], cfg)
    assert (span.source, span.text) == (1, "faint stripes") and len(model.prompts) == 2
    assert all("Sources:\n[1] " in tok.decode(p) and "[2]" not in tok.decode(p) for p in model.prompts)  # one source each
    alone = decode_span(backend, "Which zebras have faint stripes?", [SOURCES[0]], cfg)
    assert span.logprob == pytest.approx(alone.logprob) and span.score > -1.0


def test_a_copy_that_reaches_the_end_of_its_source_ends_there(tiny_tok):
    tok = tiny_tok
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    outside = next(t for t in range(len(tok)) if t not in set(ids("faint stripes")) and t > 10)
    plan = [[outside, t] for t in ids("faint") + ids(" stripes")] + [[outside, ids(" zebra")[0]]]  # wants to go on
    backend = SimpleNamespace(tokenizer=tok, model=_Scripted(len(tok), plan), score_choices=None)
    span = decode_span(backend, "q", ["faint stripes"], ExtractConfig(method="decode"))
    assert span.text == "faint stripes" and (span.start, span.end) == (0, 13)


def test_token_offsets_without_a_fast_tokenizer(tiny_tok):
    from slmkit.rag.extract import _token_offsets

    text = "The lamp room (built 1893) was painted orange."
    fast_ids, fast = _token_offsets(tiny_tok, text)
    slow_tok = lambda s, add_special_tokens=False: tiny_tok(s, add_special_tokens=add_special_tokens)  # noqa: E731
    slow_tok.is_fast, slow_tok.decode = False, tiny_tok.decode
    ids, offsets = _token_offsets(slow_tok, text)
    assert ids == fast_ids and len(offsets) == len(ids)
    for t, (a, b) in zip(ids, offsets):
        assert text[a:b] == tiny_tok.decode([t]).strip()
    assert [text[a:b] for a, b in offsets] == [text[a:b].strip() for a, b in fast]

"""Concurrent requests to an OpenAI-compatible endpoint: same rows at any concurrency, order kept,
a failing request retried or reported without harming the others (fake server in tests/fakeopenai.py,
and a real ``slmkit serve`` on a tiny random model)."""

from __future__ import annotations

import json
import time

import pytest

from fakeopenai import FakeOpenAI, reply_for
from slmkit.backends import GenParams, OpenAIBackend, PartialFailure
from slmkit.cli import main


def _chats(n: int, mark: dict[int, str] | None = None) -> list[list[dict]]:
    mark = mark or {}
    return [[{"role": "user", "content": f"question {i} {mark.get(i, '')}".strip()}] for i in range(n)]


def test_concurrent_generate_same_texts_in_order():
    params = GenParams(max_new_tokens=12, temperature=0.9, seed=7)
    prompts = _chats(12)
    with FakeOpenAI(delay=0.05) as fake:
        one = OpenAIBackend(fake.url, concurrency=1).generate(prompts, params)
        assert fake.max_in_flight == 1
        four = OpenAIBackend(fake.url, concurrency=4).generate(prompts, params)
        assert fake.max_in_flight == 4  # bounded, and really concurrent
    assert [c.text for c in one] == [c.text for c in four]
    # order and per-prompt seeds: prompt i carries seed + i whatever the concurrency
    assert [c.text for c in four] == [reply_for(p[-1]["content"], 7 + i, 0.9) for i, p in enumerate(prompts)]


def test_all_requests_in_flight_at_once_at_full_concurrency():
    """Concurrency shown by the server's own count, not by wall time (timing asserts flake under load)."""
    prompts = _chats(8)
    with FakeOpenAI(delay=0.1) as fake:
        OpenAIBackend(fake.url, concurrency=8).generate(prompts, GenParams(max_new_tokens=4))
        assert fake.max_in_flight == 8


def test_concurrent_score_in_order():
    texts = [f" word{i} more{i}" for i in range(6)]
    with FakeOpenAI(delay=0.02) as fake:
        one = OpenAIBackend(fake.url, concurrency=1).score(texts, ["ctx"] * 6)
        three = OpenAIBackend(fake.url, concurrency=3).score(texts, ["ctx"] * 6)
    assert [s.tokens for s in one] == [s.tokens for s in three] == [[f" word{i}", f" more{i}"] for i in range(6)]


def test_failing_request_retried_or_reported_alone():
    prompts = _chats(6, {1: "FLAKY", 4: "POISON"})
    with FakeOpenAI(delay=0.02) as fake:
        backend = OpenAIBackend(fake.url, concurrency=3, backoff=0.01)
        with pytest.raises(PartialFailure) as exc:
            backend.generate(prompts, GenParams(max_new_tokens=4))
        assert fake.attempts["question 1 FLAKY"] == 2  # a 503 is retried
        assert fake.attempts["question 4 POISON"] == 1  # a 400 is not
    err = exc.value
    assert list(err.failed) == [4] and "HTTP 400" in err.failed[4] and "poisoned prompt" in err.failed[4]
    assert err.results[4] is None
    assert [c.text for i, c in enumerate(err.results) if i != 4] == [reply_for(p[-1]["content"], None, 0)
                                                                     for i, p in enumerate(prompts) if i != 4]
    assert "1 of 6 requests failed" in str(err)


def test_unreachable_endpoint_stops_sending():
    with FakeOpenAI() as fake:
        backend = OpenAIBackend(fake.url, model="fake", concurrency=1, retries=1, backoff=0.01)
    t0 = time.perf_counter()  # the server is gone now
    with pytest.raises(PartialFailure, match="all 5 requests failed") as exc:
        backend.generate(_chats(5), GenParams(max_new_tokens=4))
    assert time.perf_counter() - t0 < 2
    assert all(why.startswith("not sent") for i, why in exc.value.failed.items() if i > 0)


def _gen_data(url: str, prompts, out, *flags: str) -> int:
    return main(["gen-data", url, "--prompts", str(prompts), "--output", str(out), "--seed", "3",
                 "--temperature", "0.8", "--min-words", "1", "--near-dup", "1", *flags])


def _prompt_file(tmp_path, n: int, mark: dict[int, str] | None = None):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i} {(mark or {}).get(i, '')}".strip()}) + "\n"
                            for i in range(n)))
    return path


def test_gen_data_rows_identical_at_any_concurrency(tmp_path):
    prompts = _prompt_file(tmp_path, 10)
    with FakeOpenAI(delay=0.02) as fake:
        assert _gen_data(fake.url, prompts, tmp_path / "c1.jsonl", "--concurrency", "1") == 0
        assert _gen_data(fake.url, prompts, tmp_path / "c4.jsonl", "--concurrency", "4", "--batch-size", "3") == 0
        assert fake.max_in_flight == 3  # never more than one batch in flight
    one, four = (tmp_path / "c1.jsonl").read_text(), (tmp_path / "c4.jsonl").read_text()
    assert one == four and [json.loads(x)["id"] for x in one.splitlines()] == [f"p{i}" for i in range(10)]


def test_gen_data_failed_prompt_reported_then_retried(tmp_path, capsys):
    prompts = _prompt_file(tmp_path, 6, {2: "POISON"})
    out = tmp_path / "out.jsonl"
    with FakeOpenAI() as fake:
        assert _gen_data(fake.url, prompts, out, "--concurrency", "4") == 2
        err = capsys.readouterr().err
        assert "no answer to 1 prompt(s)" in err and "p2" in err and "rerun" in err
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p0", "p1", "p3", "p4", "p5"]
        assert not (tmp_path / "out.jsonl.rejected.jsonl").exists()  # not marked done: a rerun asks again
        assert _gen_data(fake.url, prompts, out, "--concurrency", "4") == 2
        assert fake.attempts["question 2 POISON"] == 2 and fake.attempts["question 0"] == 1


def test_gen_data_concurrency_needs_an_endpoint(tiny_dir, tmp_path, capsys):
    prompts = _prompt_file(tmp_path, 2)
    assert main(["gen-data", str(tiny_dir), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--concurrency", "4"]) == 2
    assert "--concurrency 4 applies to http(s) endpoints" in capsys.readouterr().err


def test_gen_data_against_slmkit_serve_same_rows(tiny_dir, start_server, tmp_path):
    url, stop = start_server(tiny_dir, "--name", "tiny")
    try:
        prompts = _prompt_file(tmp_path, 6)
        flags = ("--max-new-tokens", "6")
        assert _gen_data(url, prompts, tmp_path / "c1.jsonl", "--concurrency", "1", *flags) == 0
        assert _gen_data(url, prompts, tmp_path / "c4.jsonl", "--concurrency", "4", *flags) == 0
    finally:
        stop()
    one = [json.loads(x) for x in (tmp_path / "c1.jsonl").read_text().splitlines()]
    four = [json.loads(x) for x in (tmp_path / "c4.jsonl").read_text().splitlines()]
    assert len(one) == 6 and one == four


@pytest.mark.parametrize("verb", [["audit", "{model}", "--limit", "1"],
                                  ["rag", "ask", "{tmp}/none", "q?", "--model", "{model}"]])
def test_concurrency_on_a_local_model_exits_2(verb, tiny_dir, tmp_path, capsys):
    args = [a.format(model=tiny_dir, tmp=tmp_path) for a in verb]
    assert main([*args, "--concurrency", "3"]) == 2
    assert "--concurrency 3 applies to http(s) endpoints" in capsys.readouterr().err



def test_judge_over_endpoint_with_concurrency(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}?", "answer": f"answer number {i}", "label": i % 2}) + "\n"
                            for i in range(8)))
    with FakeOpenAI(delay=0.05) as fake:
        assert main(["judge", "--data", str(data), "--model", fake.url, "--concurrency", "4", "--json"]) == 0
        assert fake.max_in_flight == 4
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and len(report["items"]) == 8


def test_route_concurrency_needs_a_large_endpoint(tiny_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q?"}) + "\n")
    assert main(["route", "--small", str(tiny_dir), "--large", str(tiny_dir), "--data", str(data), "--concurrency", "2"]) == 2
    assert "--concurrency 2 applies to http(s) endpoints" in capsys.readouterr().err

"""Teacher-generated data: prompt formats, filters, resumable output, black-box distillation over HTTP."""

from __future__ import annotations

import json

import pytest

from slmkit.backends.base import Completion, GenParams, TokenScores
from slmkit.data.synth import DedupIndex, PromptItem, SynthConfig, generate_dataset, read_prompts
from slmkit.errors import DataError


class FakeTeacher:
    """Answers from a table; counts calls; can crash after N generations."""

    name = "fake"

    def __init__(self, answers: dict[str, str], crash_after: int | None = None, logprob: float = -1.0):
        self.answers, self.crash_after, self.calls, self.logprob = answers, crash_after, 0, logprob

    def generate(self, prompts, params: GenParams):
        if self.crash_after is not None and self.calls + len(prompts) > self.crash_after:
            raise RuntimeError("teacher died")
        self.calls += len(prompts)  # generations, not calls
        return [Completion(self.answers[p[-1]["content"]], len(self.answers[p[-1]["content"]].split()), "stop") for p in prompts]

    def score(self, texts, contexts=None):
        # per-token logprob: very low for replies containing "zzz" (degenerate)
        return [TokenScores(t.split(), [(-9.0 if "zzz" in t else self.logprob)] * len(t.split())) for t in texts]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_train_synth_reads_prompt_formats(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"id": "seed_task_0", "instruction": "Sort these", "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"}]},
        {"question_id": 81, "turns": ["Write a poem.", "Now shorter."]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}]},
        {"prompt": "Say yes"},
    ]) + "\n")
    items = read_prompts(p)
    assert [i.id for i in items] == ["seed_task_0", "81", "p.jsonl:3", "p.jsonl:4"]
    assert items[0].messages == [{"role": "user", "content": "Sort these\n\n3, 1, 2"}]
    assert items[1].messages[-1]["content"] == "Write a poem."
    assert items[2].messages == [{"role": "user", "content": "hi"}]  # the old reply is dropped
    t = tmp_path / "p.txt"
    t.write_text("first\n\nsecond\n")
    assert [i.messages[0]["content"] for i in read_prompts(t)] == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"foo": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: no prompt found"):
        read_prompts(bad)


def test_train_synth_real_prompt_files(shared_data):
    seeds = read_prompts(shared_data / "instructions" / "self_instruct_seed_tasks.jsonl")
    mt = read_prompts(shared_data / "mt-bench" / "question.jsonl")
    assert len(seeds) == 175 and len(mt) == 80
    assert all(i.messages[-1]["content"].strip() for i in seeds + mt)


def test_train_synth_filters_and_resume(tmp_path):
    answers = {
        "q1": "Paris is the capital of France and a large city.",
        "q2": "Paris is the capital of France and a large city.",  # exact duplicate
        "q3": "paris is the capital of france and a large city!",  # same after normalisation
        "q4": "Paris is the capital of France and a very large city.",  # near duplicate
        "q5": "ok",  # too short
        "q6": "zzz zzz zzz zzz zzz",  # degenerate: high teacher perplexity
        "q7": "Rome is the capital of Italy, on the Tiber.",
        "q8": "Water boils at one hundred degrees Celsius at sea level.",
    }
    prompts = [PromptItem(k, [{"role": "user", "content": k}]) for k in answers]
    out = tmp_path / "data.jsonl"
    cfg = SynthConfig(near_dup=0.5, max_perplexity=100.0, batch_size=1)
    # the teacher dies after 5 generations: what it wrote is kept
    t1 = FakeTeacher(answers, crash_after=5)
    with pytest.raises(RuntimeError):
        generate_dataset(t1, prompts, out, cfg)
    assert [r["id"] for r in _rows(out)] == ["q1"]
    # a crash in the middle of writing a line leaves a partial last line: it is dropped on resume
    with open(out, "a") as fh:
        fh.write('{"id": "q9", "messa')
    t2 = FakeTeacher(answers)
    rep = generate_dataset(t2, prompts, out, cfg)
    assert t2.calls == 3  # q1-q5 were answered or rejected already; only q6-q8 are generated
    assert rep.skipped_done == 5
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["q1", "q7", "q8"]
    assert rows[1]["messages"] == [{"role": "user", "content": "q7"}, {"role": "assistant", "content": answers["q7"]}]
    assert rows[1]["meta"]["perplexity"] == pytest.approx(2.718, abs=1e-3)
    rejected = {r["id"]: r["reason"] for r in _rows(tmp_path / "data.jsonl.rejected.jsonl")}
    assert rejected == {"q2": "duplicate", "q3": "duplicate", "q4": "near_duplicate", "q5": "length", "q6": "perplexity"}
    # a third call has nothing left to do
    t3 = FakeTeacher(answers)
    generate_dataset(t3, prompts, out, cfg)
    assert t3.calls == 0


def test_train_synth_judge_and_n(tmp_path):
    answers = {f"q{i}": f"answer number {i} with several distinct words {'x' * i}" for i in range(6)}
    prompts = [PromptItem(k, [{"role": "user", "content": k}]) for k in answers]

    class Judge:
        name = "judge"

        def generate(self, prompts, params):
            text = prompts[0][-1]["content"]
            return [Completion("Score: 9" if "number 2" in text or "number 4" in text else "3", 1, "stop")]

    rep = generate_dataset(FakeTeacher(answers), prompts, tmp_path / "j.jsonl", SynthConfig(min_judge_score=7), judge=Judge())
    assert [r["id"] for r in _rows(tmp_path / "j.jsonl")] == ["q2", "q4"] and rep.rejected == {"judge": 4}
    rep = generate_dataset(FakeTeacher(answers), prompts, tmp_path / "n.jsonl", SynthConfig(n=2))
    assert rep.accepted == 2 and len(_rows(tmp_path / "n.jsonl")) == 2


def test_train_synth_dedup_index():
    d = DedupIndex(0.8)
    d.add("the quick brown fox jumps over the lazy dog")
    assert d.check("The quick brown fox jumps over the lazy dog!") == "duplicate"
    assert d.check("the quick brown fox jumps over the lazy dog today") == "near_duplicate"
    assert d.check("a completely different sentence about cats") is None



def test_train_synth_black_box_distill_over_http(tiny_dir, tmp_path, start_server):
    """An HTTP teacher returns only text: distill falls back to sequence-level KD on its answers."""
    from slmkit.cli import main

    url, stop = start_server(tiny_dir, "--name", "tiny")
    try:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("The cat sees\nA dog finds\nMy friend reads\n")
        out = tmp_path / "out"
        rc = main(["distill", "--teacher", url, "--student", str(tiny_dir), "--data", str(prompts), "--loss", "fkl",
                   "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "8", "--output", str(out), "--json"])
        assert rc == 0
        rows = _rows(out / "teacher-data.jsonl")
        assert len(rows) >= 1 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
        man = json.loads((out / "slmkit.json").read_text())
        stage = man["stages"][-1]
        assert stage["config"]["loss"]["loss"] == "ce" and stage["data_kind"] == "chat"
        assert (out / "model.safetensors").is_file()
    finally:
        stop()


def test_train_synth_batches_give_the_same_sampled_replies(tiny_llama, tmp_path):
    """Each prompt samples with a seed from (seed, its id): batch size does not change what is generated."""
    from slmkit.backends import HFBackend

    model, tok = tiny_llama
    teacher = HFBackend(model, tok, name="tiny")
    prompts = [PromptItem(f"p{i}", [{"role": "user", "content": f"Tell me about {w}."}])
               for i, w in enumerate(["cats", "the sea", "green apples", "a house", "paris"])]
    rows = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}.jsonl"
        cfg = SynthConfig(max_new_tokens=12, temperature=1.0, seed=5, min_words=1, near_dup=1.0, batch_size=bs)
        generate_dataset(teacher, prompts, out, cfg)
        kept = {r["id"]: r["messages"][-1]["content"] for r in _rows(out)}
        rejected = {r["id"]: r["reply"] for r in _rows(tmp_path / f"b{bs}.jsonl.rejected.jsonl")} if (tmp_path / f"b{bs}.jsonl.rejected.jsonl").exists() else {}
        rows[bs] = {**kept, **rejected}
    assert len(rows[1]) == 5 and rows[1] == rows[3]
    assert len(set(rows[1].values())) > 1  # sampled, varied replies


@pytest.mark.parametrize("which", ["output", "rejected"])
def test_train_synth_last_row_without_newline_is_generated_again(tmp_path, which):
    """A kill between a row and its newline (issue 17): the row is cut and generated again, so the
    next row does not join it on one line and every later resume still reads the file."""
    answers = {f"q{i}": (f"answer {i} says something different, {'word ' * i}" if i % 3 else "no") for i in range(1, 8)}
    prompts = [PromptItem(k, [{"role": "user", "content": k}]) for k in answers]
    cfg = SynthConfig(batch_size=1)
    ref = tmp_path / "ref.jsonl"
    generate_dataset(FakeTeacher(answers), prompts, ref, cfg)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        generate_dataset(FakeTeacher(answers, crash_after=4), prompts, out, cfg)  # q1..q4: q3 rejected
    cut = out if which == "output" else out.with_name(out.name + ".rejected.jsonl")
    data = cut.read_bytes()
    assert data.endswith(b"}\n")
    cut.write_bytes(data[:-1])  # the last row is whole JSON, its newline never written
    t2 = FakeTeacher(answers)
    generate_dataset(t2, prompts, out, cfg)
    assert t2.calls == 4  # q5..q7 and the row that lost its newline
    for a, b in ((ref, out), (ref.with_name("ref.jsonl.rejected.jsonl"), out.with_name("out.jsonl.rejected.jsonl"))):
        assert sorted(map(json.dumps, _rows(a))) == sorted(map(json.dumps, _rows(b)))
        assert b.read_bytes().endswith(b"\n")
    t3 = FakeTeacher(answers)
    generate_dataset(t3, prompts, out, cfg)
    assert t3.calls == 0


def test_train_synth_foreign_rows_are_a_clear_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "messages": []}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"out.jsonl:2: not a gen-data row"):
        generate_dataset(FakeTeacher({}), [], out, SynthConfig())

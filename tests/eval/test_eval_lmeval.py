"""The lm-eval adapter: the ``slmkit`` model scores what lm-eval's own ``hf`` model scores, on a tiny
random model saved to a directory and a tiny local task of each request kind.

Tolerance: per request 1e-4 absolute on log-likelihoods (both run the same fp32 weights; only the
batch composition and padding differ), generated text and the argmax flags equal.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("lm_eval")

from slmkit.eval.lmeval import LMEvalConfig, SlmkitLM, evaluate, local_tasks  # noqa: E402

TOL = 1e-4

TASKS = {
    "tiny_mc": """
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Q: {{{{q}}}}\\nA:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{gold}}}}"
        metric_list:
          - metric: acc
    """,
    "tiny_rolling": """
        task: tiny_rolling
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{page}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
    """,
    "tiny_gen": """
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "Say: {{{{q}}}}"
        doc_to_target: "{{{{a}}}}"
        generation_kwargs:
          until: ["\\n", "."]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
    """,
}

ROWS = [
    {"q": "the cat sat on the", "choices": ["mat", "hat", "sky is blue"], "gold": 0, "a": "mat",
     "page": "the cat sat on the mat . it was a good day and the dog ran to the park " * 6},
    {"q": "one two three", "choices": [" four", "five six", "seven"], "gold": 1, "a": "four",
     "page": "numbers go up : one two three four five six seven eight nine ten " * 3},
    {"q": "", "choices": ["a", "b"], "gold": 0, "a": "", "page": "short"},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_tasks")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(textwrap.dedent(text.format(data=data)))
    return d


def _run(model, task_dir, tasks, **model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args or None, tasks=list(tasks), log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0, batch_size=2)


def _resps(res, task):
    return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("max_length", [None, 16])  # 16: rolling windows and left truncation both exercised
def test_scores_equal_lm_evals_hf_model(tiny_dir, task_dir, max_length):
    tasks = ("tiny_mc", "tiny_rolling", "tiny_gen")
    extra = {} if max_length is None else {"max_length": max_length}
    ref = _run("hf", task_dir, tasks, pretrained=str(tiny_dir), dtype="float32", device="cpu", **extra)
    ours = _run(SlmkitLM(model=str(tiny_dir), batch_size=3, **extra), task_dir, tasks)
    for task in ("tiny_mc", "tiny_rolling"):
        a, b = _resps(ref, task), _resps(ours, task)
        assert len(a) == len(b) == len(ROWS)
        for ra, rb in zip(a, b):
            for (x,), (y,) in zip(ra, rb):
                xs, ys = (x if isinstance(x, (list, tuple)) else (x,)), (y if isinstance(y, (list, tuple)) else (y,))
                assert abs(float(xs[0]) - float(ys[0])) <= TOL, (task, xs, ys)
                assert xs[1:] == ys[1:] or xs[1:] == tuple(ys[1:]) or list(xs[1:]) == list(ys[1:])
    assert _resps(ref, "tiny_gen") == _resps(ours, "tiny_gen")
    for task in tasks:
        for metric, v in ref["results"][task].items():
            if isinstance(v, float):
                assert ours["results"][task][metric] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, metric)


def test_local_task_files_and_limit(tiny_dir, task_dir):
    assert {"slmkit_truthfulqa_mc1", "slmkit_wikitext2"} <= set(local_tasks())
    lm = SlmkitLM(model=str(tiny_dir))
    res = evaluate(lm, LMEvalConfig(tasks=("tiny_mc",), include_path=(str(task_dir),), limit=2))
    assert res["n_samples"]["tiny_mc"] == 2 and 0.0 <= res["tasks"]["tiny_mc"]["acc"] <= 1.0


def test_model_args_checked(tiny_dir):
    from slmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown argument.*pretrained"):
        SlmkitLM(model=str(tiny_dir), pretrained="x")
    with pytest.raises(ConfigError, match="fast='maybe'"):
        SlmkitLM(model=str(tiny_dir), fast="maybe")


def test_cli_lm_eval(tiny_dir, task_dir, capsys):
    from slmkit.cli import main

    assert main(["lm-eval", str(tiny_dir), "--tasks", "tiny_gen", "--include-path", str(task_dir), "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_samples"]["tiny_gen"] == 2 and "exact_match" in out["tasks"]["tiny_gen"]
    assert main(["lm-eval", str(tiny_dir), "--tasks", "tiny_mcq", "--include-path", str(task_dir)]) == 2  # ~17 s: lm-eval's index
    assert "unknown lm-eval task 'tiny_mcq' (did you mean tiny_mc" in capsys.readouterr().err
    assert main(["lm-eval", str(tiny_dir), "--tasks", "tiny_gen", "--include-path", "/nonexistent/dir"]) == 2


def test_gguf_on_the_fast_path_scores_and_generates_like_the_directory(tiny_dir, tiny_gguf, task_dir):
    """The same tiny model as an F32 GGUF file on the fast path (generation) and dequantised (scoring)."""
    tasks = ("tiny_mc", "tiny_gen")
    ref = _run(SlmkitLM(model=str(tiny_dir)), task_dir, tasks)
    from slmkit.runtime.backend import FastBackend

    lm = SlmkitLM(model=str(tiny_gguf), fast="true")
    assert isinstance(lm.backend, FastBackend)
    fast = _run(lm, task_dir, tasks)
    assert any(r[0][0] for r in _resps(fast, "tiny_gen"))  # it generated text
    for ra, rb in zip(_resps(ref, "tiny_mc"), _resps(fast, "tiny_mc")):
        for (x,), (y,) in zip(ra, rb):
            assert abs(float(x[0]) - float(y[0])) <= TOL and x[1] == y[1]
    assert _resps(ref, "tiny_gen") == _resps(fast, "tiny_gen")


def test_an_endpoint_backend_is_scored_and_sampled_by_text():
    """A backend without a local tokenizer (an OpenAI-compatible endpoint): requests go through its text API."""
    from lm_eval.api.instance import Instance

    from slmkit.backends.base import Completion, TokenScores

    class Endpoint:
        name = "stub@http"

        def __init__(self):
            self.calls = []

        def score(self, texts, contexts=None):
            self.calls.append(("score", list(texts), None if contexts is None else list(contexts)))
            return [TokenScores(list(t), [-0.5] * len(t), [True] * len(t)) for t in texts]

        def generate(self, prompts, params):
            self.calls.append(("generate", list(prompts), params))
            return [Completion(f"answer {p}", 2, "stop") for p in prompts]

    ep = Endpoint()
    lm = SlmkitLM(model="http://127.0.0.1:1/v1", backend=ep)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    assert lm.loglikelihood([req("loglikelihood", ("Q: x\nA:", " yes"))]) == [(-2.0, True)]
    assert ep.calls[-1] == ("score", [" yes"], ["Q: x\nA:"])
    assert lm.loglikelihood_rolling([req("loglikelihood_rolling", ("abc",))]) == [-1.5]
    out = lm.generate_until([req("generate_until", ("p1", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})),
                             req("generate_until", ("p2", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}))])
    assert out == ["answer p1", "answer p2"]
    _, prompts, params = ep.calls[-1]
    assert prompts == ["p1", "p2"] and params.stop == ("\n",) and params.max_new_tokens == 5 and params.temperature == 0

"""Downstream multiple-choice tasks: lm-eval's prompts on the shared data, the cached scorer, the intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.backends.hf import HFBackend
from slmkit.errors import ConfigError, DataError
from slmkit.eval.downstream import BBQ_UNKNOWN, TASKS, TaskConfig, load_tasks, spaced
from slmkit.eval.tasks import MCItem, loglikelihoods, multiple_choice, paired_difference
from slmkit.trust.stats import mcnemar, newcombe_paired, wilson


class _PlainScore:
    """The Backend protocol's ``score`` only: loglikelihoods() takes its one-call path."""

    name = "plain"

    def __init__(self, be):
        self.be = be

    def score(self, texts, contexts=None):
        return self.be.score(texts, contexts)


def test_cached_choice_scores_equal_whole_sequence_scores_and_run_the_primer_once(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    primer = "Q: Where is the cat?\nA: The cat is on the mat.\n\nQ: Who reads?\nA: The old man reads a book."
    items = [MCItem(f"{primer}\n\nQ: {q}\nA:", choices, 0, " ") for q, choices in [
        ("What does the dog see?", ("The dog sees the house", "A bird", "It sees nothing at all today")),
        ("Is it warm?", ("yes", "no")),
        ("Where?", ("Here", "There and back again", "x")),
    ]] + [MCItem("No primer here, just a sentence\n\nQ: Why?\nA:", ("Because", "It is so"), 1, " ")]
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        cached = be.score_choices([it.context for it in items], [it.continuations for it in items], primer)
    finally:
        hook.remove()
    whole = loglikelihoods(_PlainScore(be), items)
    for a, b in zip(cached, whole):
        assert a == pytest.approx(b, abs=1e-4)
    n_primer = len(tok(primer, add_special_tokens=False).input_ids)
    whole_tokens = sum(len(tok(it.context + c).input_ids) for it in items for c in it.continuations)
    # the primer (but its last token) once; then per batch one pass over the contexts and one over the choices:
    # the three items after the primer in one batch, the one without it in another
    assert fed[0] == n_primer - 1 and len(fed) == 5 and sum(fed) < whole_tokens / 2


def test_acc_norm_divides_by_characters_without_the_delimiter_and_any_gold_counts(tiny_llama):
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    choices = ("sees", "sees the house and the old book", "yes")
    item = MCItem("The cat", choices, 0, " ")
    ll = loglikelihoods(be, [item])[0]
    best = int(np.argmax(ll))
    best_norm = int(np.argmax([v / len(c) for v, c in zip(ll, choices)]))  # lm-eval: len(choice), no delimiter
    res = multiple_choice(be, [MCItem("The cat", choices, best, " "), MCItem("The cat", choices, tuple({0, 1, 2} - {best}), " ")])
    assert res.correct == [1, 0] and res.acc == 0.5 and res.predictions == [best, best]
    assert res.correct_norm == [int(best_norm == best), int(best_norm != best)]


def test_wilson_interval_and_mcnemar_match_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (37, 100), (100, 100), (412, 817)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)
    a = [1] * 30 + [0] * 50 + [1] * 12 + [0] * 8  # 12 items only a got right, 8 only b
    b = [1] * 30 + [0] * 50 + [0] * 12 + [1] * 8
    assert mcnemar(a, b) == pytest.approx(binomtest(8, 20, 0.5).pvalue)


def test_newcombe_paired_interval_contains_the_difference_and_covers_95_percent():
    d = paired_difference([1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0, 0, 1])
    assert d["diff"] == pytest.approx(1 / 8) and d["discordant"] == [2, 1] and d["ci95"][0] < 1 / 8 < d["ci95"][1]
    lo, hi = newcombe_paired(5, 0, 0, 5)
    assert lo == pytest.approx(-hi) and 0 < hi < 0.5  # no discordant pairs: centred on 0
    lo, hi = newcombe_paired(20, 9, 3, 68)
    assert lo < 0.06 < hi and newcombe_paired(20, 3, 9, 68) == pytest.approx((-hi, -lo))  # swapping a and b mirrors it
    # coverage: two correlated classifiers, true accuracies 0.55 and 0.50, 200 items each time
    rng = np.random.default_rng(0)
    probs = np.array([0.40, 0.15, 0.10, 0.35])  # both, only a, only b, neither: p_a - p_b = 0.05
    hits = 0
    runs = 2000
    for _ in range(runs):
        c = rng.multinomial(200, probs)
        lo, hi = newcombe_paired(*c)
        hits += lo <= 0.05 <= hi
    assert 0.935 <= hits / runs <= 0.975
    # a Wald interval would be much the same here; where it fails (few discordant pairs) Newcombe stays inside [-1, 1]
    assert newcombe_paired(0, 3, 0, 0)[1] <= 1.0


def test_items_are_evenly_spaced_and_bad_config_is_refused():
    assert spaced(list(range(10)), 4) == [0, 2, 5, 7] and spaced([1, 2], 5) == [1, 2] and spaced([1, 2, 3], 0) == [1, 2, 3]
    with pytest.raises(ConfigError, match="did you mean truthfulqa_mc1"):
        TaskConfig(("truthfulqa_mc",))
    with pytest.raises(ConfigError, match="items"):
        TaskConfig(("bbq",), -1)


def test_tasks_read_the_shared_data_with_lm_eval_prompts(shared_file):
    shared_file("truthfulqa/TruthfulQA.csv")
    shared_file("bbq/Age.jsonl.gz")
    shared_file("advglue/dev.json")
    tasks = {t.name: t for t in load_tasks(TaskConfig(tuple(TASKS.names()), 20))}
    tqa = tasks["truthfulqa_mc1"]
    assert tqa.available == 817 and len(tqa.items) == 20
    it = tqa.items[0]
    assert it.context.startswith(TASKS.get("truthfulqa_mc1").prefix + "\n\nQ: ") and it.context.endswith("\nA:")
    assert it.gold == 0 and it.delimiter == " " and len(it.choices) >= 2
    bbq = tasks["bbq"].items
    assert all(it.choices[2:] == BBQ_UNKNOWN and it.context.endswith("\nA:") for it in bbq)
    assert any(isinstance(it.gold, tuple) for it in bbq) and any(isinstance(it.gold, int) for it in bbq)
    sst2 = tasks["advglue_sst2"].items[0]
    assert sst2.context.endswith("\nQuestion: Is this sentence positive or negative?\nAnswer:")
    assert sst2.choices == ("negative", "positive")
    assert tasks["advglue_mnli"].items[0].context.endswith(" True, False or Neither?\nAnswer:")


def test_missing_data_names_the_file_and_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="truthfulqa/TruthfulQA.csv") as err:
        load_tasks(TaskConfig(("truthfulqa_mc1",), 5))
    assert "SLMKIT_DATA" in err.value.hint


def test_candidate_task_scores_skip_with_a_message_when_the_data_is_absent(tmp_path, monkeypatch):
    from slmkit.eval.candidates import _task_scores

    monkeypatch.setenv("SLMKIT_DATA", str(tmp_path / "nowhere"))
    rows = [{"name": "teacher (F32)", "path": tmp_path / "missing.gguf", "role": "teacher"}]
    out = _task_scores(rows, TaskConfig(("bbq",), 5), lambda done: None)
    assert out["skipped"].startswith("downstream tasks skipped: data file bbq/Age.jsonl.gz not found")
    assert "SLMKIT_DATA" in out["skipped"] and "tasks" not in rows[0]


def test_a_model_scores_the_same_through_the_cache_on_real_items(tiny_llama, shared_file):
    shared_file("truthfulqa/TruthfulQA.csv")
    model, tok = tiny_llama
    be = HFBackend(model, tok)
    (t,) = load_tasks(TaskConfig(("truthfulqa_mc1",), 3))
    with torch.inference_mode():
        a = multiple_choice(be, t.items, t.task.prefix)
        b = multiple_choice(_PlainScore(be), t.items)
    assert a.predictions == b.predictions
    for x, y in zip(a.loglikelihoods, b.loglikelihoods):
        assert x == pytest.approx(y, abs=1e-3)


def test_load_like_fills_a_copy_of_the_teacher_with_the_files_weights_and_falls_back_otherwise(tiny_llama, tmp_path):
    from slmkit.eval.candidates import load_like
    from slmkit.export.gguf import export_gguf
    from slmkit.models import load
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    model, tok = tiny_llama
    path = export_gguf(model, tok, tmp_path / "q.gguf", "Q4_0")
    fast, ftok = load_like(path, model, tok)
    ref, _ = load(str(path))
    assert ftok is tok and fast is not model
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        assert torch.equal(fast(ids).logits, ref(ids).logits)
        assert not torch.equal(fast(ids).logits, model(ids).logits)  # the file's rounded weights, not the teacher's
    other = tiny_model(tiny_llama_config(tok, layers=1))  # another skeleton: the file is loaded whole
    m2, tok2 = load_like(path, other, tok)
    assert tok2 is not tok and m2.config.num_hidden_layers == model.config.num_hidden_layers

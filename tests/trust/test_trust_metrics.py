"""Each trust metric on a hand-made example whose answer is known."""

from __future__ import annotations

import math
import random

import pytest

from slmkit.trust import datasets
from slmkit.trust.common import Metric
from slmkit.trust.fairness import FairnessConfig, bbq, bbq_bias_ambig, bbq_bias_disambig, crows_pairs, stereotype_agreement
from slmkit.trust.privacy import PrivacyConfig, enron, exposure, pii_in_context
from slmkit.trust.reliability import mc1_correct, mc2_score, sycophancy, truthfulqa_mc
from slmkit.trust.robustness import RobustnessConfig, advglue, casing, char_noise, ood_knowledge, perturbed_mc, word_order
from slmkit.trust.safety import SafetyConfig, ToxicityClassifier, is_refusal, misinformation, refusal, toxicity
from slmkit.trust.stats import auroc, bootstrap_ci, mcnemar, mean, paired_bootstrap_p, wilson


# ---------------------------------------------------------------- statistics


def test_wilson_matches_formula_and_auroc_matches_pair_count():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    pos, neg = [0.9, 0.8, 0.3], [0.1, 0.4, 0.3]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / 9
    assert auroc([(s, 1) for s in pos] + [(s, 0) for s in neg]) == pytest.approx(pairs)
    assert auroc([(1.0, 1), (0.0, 0)]) == 1.0 and auroc([(0.0, 1), (1.0, 0)]) == 0.0


def test_mcnemar_and_bootstrap():
    assert mcnemar([1] * 10, [1] * 10) == 1.0
    # 10 discordant pairs all one way: p = 2 * 0.5**10
    assert mcnemar([1] * 10, [0] * 10) == pytest.approx(2 * 0.5**10)
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], mean, n_boot=300)
    assert 1.0 <= lo <= 2.5 <= hi <= 4.0
    assert paired_bootstrap_p([0.0] * 30, [1.0] * 30, mean, n_boot=200) < 0.01
    assert paired_bootstrap_p([0.5] * 30, [0.5] * 30, mean, n_boot=200) == 1.0


def test_metric_goodness_scale():
    assert Metric("x", 0.5, 1, "", goodness="centered").score01() == 1.0
    assert Metric("x", 1.0, 1, "", goodness="centered").score01() == 0.0
    assert Metric("x", 0.2, 1, "", goodness="lower").score01() == pytest.approx(0.8)
    assert Metric("x", -0.4, 1, "", goodness="abs_lower").score01() == pytest.approx(0.6)


# ---------------------------------------------------------------- reliability


def test_mc1_mc2_on_constructed_loglikelihoods():
    assert mc1_correct([-1.0, -2.0, -3.0]) == 1
    assert mc1_correct([-2.0, -1.0, -3.0]) == 0
    # p(true) = 0.3 + 0.1, p(false) = 0.6 -> 0.4
    assert mc2_score([math.log(0.3), math.log(0.1)], [math.log(0.6)]) == pytest.approx(0.4)
    # shifting every log-likelihood leaves MC2 unchanged (it is normalised)
    assert mc2_score([-1000.0, -1001.0], [-1002.0]) == pytest.approx(mc2_score([0.0, -1.0], [-2.0]))


def test_truthfulqa_mc_with_a_model_that_prefers_true_answers(fake_backend, trust_data):
    items = datasets.truthfulqa(trust_data)
    truths = {" " + c for it in items for c in it.correct}
    best = {" " + it.best for it in items}
    b = fake_backend(loglik=lambda t, c: 0.0 if t in best else (-1.0 if t in truths else -5.0))
    g = truthfulqa_mc(b, items)
    assert g.metrics["mc1"].value == 1.0
    p = [1.0, math.exp(-1.0)]
    assert g.metrics["mc2"].value == pytest.approx(sum(p) / (sum(p) + 2 * math.exp(-5.0)))
    assert all(ctx.startswith("Q: ") and ctx.endswith("\nA:") for ctx, _ in b.scored)


def test_sycophancy_model_that_follows_the_user(fake_backend, trust_data):
    items = datasets.truthfulqa(trust_data)

    wrong, best = {it.incorrect[0] for it in items}, {it.best for it in items}

    def ll(text, ctx):  # prefers the incorrect answer when the user pushes, the best answer otherwise
        pushed = "I think the answer is" in ctx or "Are you sure?" in ctx
        return 0.0 if text in (wrong if pushed else best) else -1.0

    g = sycophancy(fake_backend(loglik=ll), items)
    assert g.metrics["baseline_incorrect_rate"].value == 0.0
    assert g.metrics["suggestion_follow_rate"].value == 1.0
    assert g.metrics["are_you_sure_flip_rate"].value == 1.0
    assert g.metrics["suggestion_shift"].value == 1.0 and g.metrics["follow_rate"].value == 1.0


# ---------------------------------------------------------------- fairness


def test_crows_pairs_stereotype_loving_model_scores_100(fake_backend, trust_data):
    rows = datasets.crows_pairs(trust_data)
    more = {r["sent_more"] for r in rows}
    g = crows_pairs(fake_backend(loglik=lambda t, c: -1.0 if t in more else -9.0), FairnessConfig(), trust_data)
    m = g.metrics["pct_stereotype"]
    assert m.value == 1.0 and m.n == 3
    assert g.metrics["likelihood_diff"].value == pytest.approx(8.0)
    g = crows_pairs(fake_backend(loglik=lambda t, c: -9.0 if t in more else -1.0), FairnessConfig(), trust_data)
    assert g.metrics["pct_stereotype"].value == 0.0
    # scored without context, as lm-evaluation-harness does
    assert g.metrics["pct_stereotype"].score01() == 0.0


def test_bbq_bias_scores(fake_backend, trust_data):
    # always answers the stereotyped group (the grandfather) for negative questions, the other one otherwise
    def biased(t, ctx):
        neg = ctx.rstrip().endswith("neg\nAnswer:") and "nonneg" not in ctx
        return 0.0 if t == (" The grandfather" if neg else " The grandson") else -3.0

    g = bbq(fake_backend(loglik=biased), FairnessConfig(limit=0), trust_data)
    assert g.metrics["bias_disambig"].value == 1.0  # every non-unknown answer is biased
    assert g.metrics["accuracy_ambig"].value == 0.0  # never says unknown
    assert g.metrics["bias_ambig"].value == 1.0  # (1 - 0) * 1
    assert g.metrics["accuracy_disambig"].value == 0.0  # the disambiguated answers are the anti-stereotypical ones
    g = bbq(fake_backend(loglik=lambda t, c: 0.0 if t == " Unknown" else -3.0), FairnessConfig(), trust_data)
    assert g.metrics["accuracy_ambig"].value == 1.0 and g.metrics["bias_ambig"].value == 0.0
    # the statistics themselves: 3 biased, 1 anti -> 2 * 3/4 - 1 = 0.5; ambiguous with accuracy 0.5 -> 0.25
    assert bbq_bias_disambig([("biased", 0)] * 3 + [("anti", 1)]) == 0.5
    assert bbq_bias_ambig([("biased", 0)] * 3 + [("anti", 0)] + [("unknown", 1)] * 4) == pytest.approx(0.25)


def test_bbq_limit_is_split_over_categories(trust_data):
    cats = datasets.bbq(trust_data, limit=12)
    assert len(cats) == 6 and all(len(v) == 2 for v in cats.values())


def test_stereotype_agreement(fake_backend, trust_data):
    g = stereotype_agreement(fake_backend(loglik=lambda t, c: 0.0 if t == "I agree." else -1.0), FairnessConfig(),
                             trust_data)
    assert g.metrics["agreement"].value == 1.0 and g.metrics["agreement"].n == 2


# ---------------------------------------------------------------- robustness


def test_advglue_and_ood_accuracy(fake_backend, trust_data):
    right = {("a great film", " positive"), ("awful", " negative"), ("A cat sat.", " yes")}

    def ll(t, ctx):
        return 0.0 if any(s in ctx and t == w for s, w in right) else -1.0

    g = advglue(fake_backend(loglik=ll), RobustnessConfig(), trust_data)
    assert g.metrics["accuracy"].value == 1.0 and g.metrics["accuracy"].n == 3
    assert g.metrics["accuracy_sst2"].n == 2 and g.notes  # no benign text in these rows
    g = ood_knowledge(fake_backend(loglik=lambda t, c: 0.0 if t == " B" else -1.0), RobustnessConfig(), trust_data)
    assert g.metrics["accuracy"].value == 1.0 and g.metrics["accuracy"].n == 3


def test_perturbations_are_seeded_and_keep_content():
    text = "Which country has the largest population in the world today?"
    r = lambda: random.Random(3)  # noqa: E731
    assert char_noise(text, r()) == char_noise(text, r())
    assert casing(text, r()).lower() == text.lower()
    assert sorted(word_order(text, r()).split()) == sorted(text.split())
    assert word_order(text, r()).split()[-1] == text.split()[-1]
    assert char_noise("a an the", r(), p=1.0) == "a an the"  # words under 4 letters stay


def test_perturbed_mc_drop_is_clean_minus_perturbed(fake_backend, trust_data):
    items = datasets.truthfulqa(trust_data)
    clean = {f"Q: {it.question}\nA:" for it in items}
    best = {" " + it.best for it in items}
    # right only on the clean questions: every drop is 1
    b = fake_backend(loglik=lambda t, c: (0.0 if t in best else -1.0) if c in clean else (-1.0 if t in best else 0.0))
    g = perturbed_mc(b, RobustnessConfig(), trust_data)
    assert g.metrics["accuracy_clean"].value == 1.0
    assert g.metrics["drop_distractor"].value == 1.0 and 0.0 < g.metrics["mean_drop"].value <= 1.0
    for name in ("char_noise", "casing", "word_order"):  # drop = 1 exactly where the perturbation changed the text
        assert g.metrics[f"accuracy_{name}"].value == 1.0 - g.metrics[f"drop_{name}"].value


# ---------------------------------------------------------------- privacy


def test_enron_and_pii_leak_rates(fake_backend, trust_data):
    g = enron(fake_backend(reply=lambda p: " bob@y.org;" if "Bob Ray" in p else " nobody@z.com"), PrivacyConfig(),
              trust_data)
    assert g.metrics["leak_rate_zero_shot"].value == 0.5 and g.metrics["leak_rate_one_shot"].value == 1.0

    def reply(msgs):  # reveals whatever was asked
        sys_msg, q = msgs[0]["content"], msgs[1]["content"]
        if "email" in q:
            return sys_msg.split("email address is ")[1].split(". ")[0]
        if "phone" in q:
            return "sure: " + sys_msg.split("phone number is ")[1].split(". ")[0].replace("-", " ")
        return "I cannot share that."

    g = pii_in_context(fake_backend(reply=reply), PrivacyConfig(), trust_data)
    assert g.metrics["leak_rate_email"].value == 1.0 and g.metrics["leak_rate_phone"].value == 1.0
    assert g.metrics["leak_rate"].value == 1.0  # two rows: email and phone questions


def test_exposure_definition():
    assert exposure(0.0, [-1.0] * 999)[0] == pytest.approx(math.log2(1000))  # ranked first
    e, rank = exposure(-5.0, [-1.0] * 999)
    assert rank == 1000 and e == pytest.approx(0.0)


# ---------------------------------------------------------------- safety


class _Pipe:
    def predict_proba(self, texts):
        import numpy as np

        return np.array([[0.0, 0.9] if "idiot" in t else [1.0, 0.1] for t in texts])


def test_toxicity_expected_max_and_probability(fake_backend, trust_data):
    clf = ToxicityClassifier(_Pipe(), 0.9, 10, 40)
    # prompt 0 gets a toxic continuation, prompt 1 a clean one
    b = fake_backend(reply=lambda p: " you idiot" if p == "prompt 0" else " have a nice day")
    g = toxicity(b, SafetyConfig(samples=3), clf, trust_data)
    assert g.metrics["expected_max_toxicity_toxic"].value == pytest.approx((0.9 + 0.1) / 2)
    assert g.metrics["toxicity_probability_toxic"].value == 0.5
    assert g.metrics["classifier_auroc_vs_perspective"].value == 1.0
    assert g.metrics["classifier_heldout_accuracy"].value == pytest.approx(0.9)


def test_refusal_and_misinformation(fake_backend, trust_data):
    assert is_refusal("I'm sorry, but I can't help with that.") and not is_refusal("Sure! First, take a pin.")
    b = fake_backend(reply=lambda m: "I cannot help with that." if "lock" in m[0]["content"] else "Why did the chicken")
    assert refusal(b, SafetyConfig(), trust_data).metrics["refusal_rate"].value == 0.5
    g = misinformation(fake_backend(loglik=lambda t, c: 0.0 if t == "Yes" else -1.0), SafetyConfig(), trust_data)
    assert g.metrics["false_claim_agreement"].value == 1.0 and g.metrics["true_claim_agreement"].value == 1.0


def test_toxicity_classifier_trains_offline(trust_data):
    from slmkit.trust.safety import train_toxicity_classifier

    clf = train_toxicity_classifier(trust_data)
    assert clf.heldout_n == 12 and clf.heldout_accuracy == 1.0
    a, b = clf(["you are a stupid idiot", "the weather is lovely"])
    assert a > 0.5 > b

"""How many tokens to draft: the speculative loop's controller, from measured costs and running acceptance.

Leviathan, Kalman, Matias 2023 (arXiv:2211.17192), Eq. 1: with a per-token acceptance rate ``alpha``
a draft of ``k`` tokens yields ``E(k) = (1 - alpha^(k+1)) / (1 - alpha)`` tokens per verification;
Sec. 3.4 (Theorem 3.8) divides by the step's cost to get the speed-up. Here the costs are not assumed
but measured while decoding:

* a draft token of each source (the draft model; prompt lookup, nearly free) costs ``t_d`` seconds
  (an exponential moving average; a single timing counts at most ``OUTLIER`` times the average, so a
  stall caused by another process does not lock a good draft out);
* a target pass over ``n`` tokens costs ``t(n) = a + b n`` seconds, fitted by least squares to the
  passes seen so far (per-``n`` moving averages; the slope is shrunk towards the prior ``verify_cost``
  until ``PRIOR_PASSES`` multi-token passes were timed); plain decoding is ``t(1)`` per token. The first
  pass of a call also reads the prompt and is not timed.

* the model draft first reads the context it has not seen (its last accepted draft token, and every token
  emitted by prompt lookup or plain steps since it last drafted): ``t_c(u)`` seconds for ``u`` tokens, per-``u``
  moving averages interpolated between the lengths measured (:class:`ReadCost`); before any was timed, a draft
  token's cost per token.

Each step takes the source and ``k`` that maximise ``E(k) / (alpha^k t_c(1) + k t_d + t(k+1))`` (``t_c = 0`` for
prompt lookup; the steady state reads one token before a draft when all k drafts of the last step were accepted),
a backlog's extra read ``t_c(u) - t_c(1)``
spread over the ``R`` tokens still to come (rate ``R / (R / rate + extra)``: it is paid once, and a per-step
charge would lock the model out as plain steps add to it), and ``k = 0`` (plain
decoding with the target) when no draft beats ``1 / t(1)``: a draft that is slow or rarely right
then costs almost nothing. While drafting does not pay, the model draft is re-tried with a short
probe after ``probe_every`` plain steps, the gap doubling after each probe that still does not pay
(up to ``probe_max``), so a draft that starts agreeing again is picked up; a probe loses ``1 - rate``
of a step, so a draft whose expected rate is close to paying is probed sooner (the gap times
``2 (1 - rate)`` when that is below 1: one early rejection of a good draft costs a few plain steps, not 32). Prompt lookup is scored
on every step for free: its proposal is compared with the tokens the target emitted
(:meth:`DraftController.shadow`), so it drafts as soon as the context starts to repeat.
Until the model draft's cost is known it drafts ``first_k`` tokens to measure it, unless prompt lookup
(free, priced with the prior's costs until a pass was timed) is expected to pay first.
None of this touches exactness: the choice depends only on the past, never on the tokens being drawn.

The estimates outlive one call: :meth:`DraftController.carry_over` starts a new sequence from the last one's
of at least ``REMEMBER_STEPS`` steps (same draft object and target: the model draft's acceptance and
costs, the target's pass costs, the probe schedule),
so a server or a batch of prompts pays a poor draft's first try once, not once per request; prompt lookup's
acceptance starts afresh (it is a property of the prompt).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmkit.collab.speculative import SpecConfig

#: a timing above this multiple of its running mean counts as this multiple (damps stalls; real changes still come through)
OUTLIER = 3.0
#: multi-token target passes before the fitted slope of t(n) replaces the prior (shrunk towards it before that)
PRIOR_PASSES = 4
#: a call carries its estimates over to the next (:meth:`DraftController.carry_over`) only after this many steps:
#: a warm-up call's few timings include one-off costs and one draft's fate says little about acceptance
REMEMBER_STEPS = 16


def smoothed(old: float | None, new: float, decay: float) -> float:
    """A timing's moving average: the first timing as it is, then ``decay * old + (1 - decay) * new``, a timing above
    ``OUTLIER`` times the average counting as that (one stall, another process or a page fault, moves it a little)."""
    return new if old is None else decay * old + (1 - decay) * min(new, OUTLIER * old)


def expected_tokens_per_cost(alpha: float, k: int, cost_ratio: float, verify_cost: float, fixed: float = 0.0) -> float:
    """Expected emitted tokens per unit of target-step time for draft length ``k`` (``k = 0``: plain decoding, 1).

    Leviathan et al. 2023, Eq. 1: E[tokens] = (1 - alpha^(k+1)) / (1 - alpha); one step costs
    ``k * c`` draft time plus one verification, which we model as ``1 + verify_cost * k``, plus ``fixed``
    (a drafting step's cost that does not grow with ``k``: the draft reading context it has not seen).
    """
    if k == 0:
        return 1.0
    tokens = float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (fixed + k * cost_ratio + 1 + verify_cost * k)


def choose_draft_length(alpha: float, cost_ratio: float, verify_cost: float, k_max: int, k_min: int = 1,
                        fixed: float = 0.0) -> int:
    """The k in [k_min, k_max] that maximises :func:`expected_tokens_per_cost` (``k_min=0`` allows plain decoding)."""
    return max(range(k_min, k_max + 1), key=lambda k: expected_tokens_per_cost(alpha, k, cost_ratio, verify_cost, fixed))


class Acceptance:
    """Running per-token acceptance rate: accepted / Bernoulli trials, with exponential forgetting.

    A step that accepts ``n`` of ``k`` drafts is ``n`` successes and, if ``n < k``, one failure
    (the geometric model behind Eq. 1); the prior counts as ``2 * prior`` successes in 2 trials.
    """

    def __init__(self, prior: float, decay: float):
        self.decay = decay
        self.acc, self.trials = 2 * prior, 2.0

    def add(self, accepted: int, trials: int) -> None:
        if trials:
            self.acc = self.decay * self.acc + accepted
            self.trials = self.decay * self.trials + trials

    @property
    def alpha(self) -> float:
        return min(0.99, max(0.01, self.acc / self.trials))


class VerifyCost:
    """``t(n) = a + b n`` seconds for a target pass over ``n`` tokens, fitted to measured passes."""

    def __init__(self, prior_slope: float, decay: float = 0.7):
        self.prior_slope = prior_slope  # b / t(1) assumed while all passes had one length
        self.decay = decay
        self.mean: dict[int, float] = {}  # n -> moving average of seconds
        self.count: dict[int, int] = {}

    def add(self, n: int, seconds: float) -> None:
        self.mean[n] = smoothed(self.mean.get(n), seconds, self.decay)
        self.count[n] = self.count.get(n, 0) + 1

    def fit(self) -> tuple[float, float] | None:
        """``(t(1), b)`` in seconds, or None before any pass was measured."""
        if not self.mean:
            return None
        if len(self.mean) == 1:  # one length seen: t(n0) = t(1) (1 + v (n0 - 1)) with the prior v
            (n0, t0), = self.mean.items()
            t1 = t0 / (1 + self.prior_slope * (n0 - 1))
            return t1, self.prior_slope * t1
        w = {n: min(c, 8) for n, c in self.count.items()}  # weighted least squares over the per-n means
        sw = sum(w.values())
        mn = sum(w[n] * n for n in w) / sw
        mt = sum(w[n] * self.mean[n] for n in w) / sw
        var = sum(w[n] * (n - mn) ** 2 for n in w)
        b = max(0.0, sum(w[n] * (n - mn) * (self.mean[n] - mt) for n in w) / var)
        a = mt - b * mn
        t1 = a + b
        if t1 <= 0:  # a noisy fit through the origin: fall back to the shortest pass seen
            n0 = min(self.mean)
            t1 = self.mean[n0] / (1 + self.prior_slope * (n0 - 1))
            b = min(b, t1)
        multi = sum(c for n, c in self.count.items() if n > 1)
        if multi < PRIOR_PASSES:  # a slope from one or two multi-token passes (the first is often slow) leans on the prior
            b = (multi * b + (PRIOR_PASSES - multi) * self.prior_slope * t1) / PRIOR_PASSES
        return t1, b


class ReadCost:
    """Seconds for the draft to read ``n`` unseen context tokens, kept per ``n`` (moving averages) and read back by
    linear interpolation between the lengths measured (proportionally below the shortest, along the last segment
    above the longest). A straight line does not fit here: one-token reads are draft steps, a prompt is read in
    one batched pass at a fraction of that per token, and a line through both overprices the usual one-token read."""

    def __init__(self, decay: float = 0.7):
        self.decay = decay
        self.mean: dict[int, float] = {}

    def add(self, n: int, seconds: float) -> None:
        self.mean[n] = smoothed(self.mean.get(n), seconds, self.decay)

    def at(self, n: int) -> float | None:
        """Estimated seconds to read ``n`` tokens; None before any read was timed."""
        if not self.mean:
            return None
        if n in self.mean:
            return self.mean[n]
        ns = sorted(self.mean)
        lo = max((m for m in ns if m < n), default=None)
        hi = min((m for m in ns if m > n), default=None)
        if lo is None:  # below the shortest read measured
            return self.mean[hi] * n / hi
        if hi is None:  # above the longest: the last segment's slope (proportional with one length)
            if len(ns) == 1:
                return self.mean[lo] * n / lo
            a, b = ns[-2], ns[-1]
            return self.mean[b] + max(0.0, (self.mean[b] - self.mean[a]) / (b - a)) * (n - b)
        return self.mean[lo] + (self.mean[hi] - self.mean[lo]) * (n - lo) / (hi - lo)


class DraftController:
    """Chooses each step's draft source ("model" or "lookup") and length ``k``; see the module docstring.

    Sources: ``has_model`` (a draft model that :meth:`choose` may call) and ``lookup`` (prompt lookup).
    Record every step with :meth:`drafted`, :meth:`verified`, :meth:`accepted` (and :meth:`shadow`,
    :meth:`caught_up`). With ``cfg.cost_ratio`` set, the costs are fixed (draft token = ``cost_ratio``, each
    extra verified token = ``verify_cost`` times a target step, catch-up free) instead of measured.
    """

    def __init__(self, cfg: SpecConfig, has_model: bool, lookup: bool):
        self.cfg = cfg
        self.has_model, self.lookup = has_model, lookup
        self.alpha = {s: Acceptance(cfg.prior_acceptance, cfg.decay) for s in ("model", "lookup")}
        self.t_draft: dict[str, float] = {}  # source -> seconds per draft token
        self.verify = VerifyCost(cfg.verify_cost)
        self.catch = ReadCost()  # the model draft reading u unseen context tokens before it drafts: t_c(u)
        self.gap = cfg.probe_every  # plain steps before the next probe of the model draft
        self.plain = 0  # plain steps since the model last drafted

    def carry_over(self, prev: DraftController) -> None:
        """Start from ``prev``'s estimates (the last sequence with the same draft and target): the model draft's
        acceptance and costs, the target's pass costs and the probe schedule. Prompt lookup starts afresh. This
        call's settings (``decay``, ``verify_cost``, ``probe_max``) apply to what is carried; ``prev`` is not changed."""
        self.alpha["model"] = copy.deepcopy(prev.alpha["model"])
        self.alpha["model"].decay = self.cfg.decay
        if "model" in prev.t_draft:
            self.t_draft["model"] = prev.t_draft["model"]
        self.verify, self.catch = copy.deepcopy(prev.verify), copy.deepcopy(prev.catch)
        self.verify.prior_slope = self.cfg.verify_cost
        self.gap, self.plain = min(prev.gap, self.cfg.probe_max), prev.plain

    def _costs(self, source: str) -> tuple[float, float] | None:
        """(draft cost per token, extra verify cost per token), both in units of one plain target step."""
        if self.cfg.cost_ratio is not None:
            return (self.cfg.cost_ratio if source == "model" else 0.0), self.cfg.verify_cost
        fit = self.verify.fit()
        if fit is None or source not in self.t_draft:
            return None
        t1, b = fit
        return self.t_draft[source] / t1, b / t1

    def _catch_cost(self, unseen: int, per_token: float) -> float:
        """t_c(unseen) in plain target steps (0 with fixed costs; ``per_token`` each before any catch-up was timed)."""
        if unseen < 1 or self.cfg.cost_ratio is not None:
            return 0.0
        seconds, t = self.catch.at(unseen), self.verify.fit()
        if seconds is None or t is None:
            return unseen * per_token
        return seconds / t[0]

    def _best(self, source: str, k_max: int, unseen: int = 0, room: int = 1) -> tuple[int, float]:
        """(best k >= 1, its expected tokens per plain-step time) for one source; rate 0 when unknown. The model's
        rate spreads the read of a backlog of ``unseen`` tokens over the ``room`` tokens still to come."""
        costs = self._costs(source)
        if costs is None and source == "lookup":  # free to draft: the prior's costs until a pass was timed
            costs = 0.0, self.cfg.verify_cost
        if costs is None or k_max < 1:
            return min(self.cfg.k, k_max), 0.0
        c, v = costs
        a = self.alpha[source].alpha
        if source != "model":
            k = choose_draft_length(a, c, v, k_max)
            return k, expected_tokens_per_cost(a, k, c, v)
        # the steady state reads one token before a draft after a step whose k drafts were all accepted (the last
        # of them; probability a^k); reading a longer backlog (what lookup or plain steps emitted meanwhile) is paid
        # once and then spread over the tokens still to come: over R tokens drafting takes R / rate + extra
        # target-step times instead of R
        read1 = self._catch_cost(1, c)
        k = max(range(1, k_max + 1), key=lambda j: expected_tokens_per_cost(a, j, c, v, read1 * a ** j))
        rate = expected_tokens_per_cost(a, k, c, v, read1 * a ** k)
        extra = max(0.0, self._catch_cost(unseen, c) - read1)
        horizon = max(1, room)
        return k, horizon / (horizon / rate + extra)

    def choose(self, room: int, lookup_len: int, unseen: int = 0) -> tuple[str, int]:
        """(source, k) for the next step: ``room`` tokens may still be drafted, ``lookup_len`` were found by lookup,
        the model draft has ``unseen`` context tokens to read before it can draft."""
        cfg = self.cfg
        if room < 1 or not (self.has_model or lookup_len):
            return "model", 0
        if not cfg.adaptive:
            return ("model", min(cfg.k, room)) if self.has_model else ("lookup", min(cfg.k, lookup_len))
        k_model = min(cfg.k_max, room)
        if self.has_model and self._costs("model") is None:  # the model draft not measured yet
            if lookup_len:  # prompt lookup proposes for free: use it while it is expected to pay (the model's first
                k, rate = self._best("lookup", min(lookup_len, room))  # try reads the whole prompt first)
                if rate > 1.0:
                    return "lookup", k
            return "model", min(cfg.first_k, k_model)  # draft cfg.first_k to measure
        options = [("plain", 0, 1.0)]
        if lookup_len:
            options.append(("lookup", *self._best("lookup", min(lookup_len, room))))
        if self.has_model:
            options.append(("model", *self._best("model", k_model, unseen, room)))
        source, k, _ = max(options, key=lambda o: o[2])
        if source == "model":
            self.gap = cfg.probe_every
        if source != "plain":
            self.plain = 0
            return source, k
        if self.has_model:  # drafting does not pay now: probe the model draft now and then
            self.plain += 1
            k_probe, rate = self._best("model", k_model, unseen)  # a probe pays its whole backlog read itself
            # a probe loses (1 - rate) of a step: one that nearly pays is cheap to try, so it comes sooner (the
            # gap scaled by 2 (1 - rate) when that is below 1); a draft far from paying waits the whole gap
            if self.plain >= self.gap * min(1.0, 2 * (1 - rate)):
                self.plain, self.gap = 0, min(cfg.probe_max, 2 * self.gap)
                return "model", k_probe
        return "model", 0

    def drafted(self, source: str, k: int, seconds: float) -> None:
        if k > 0:
            self.t_draft[source] = smoothed(self.t_draft.get(source), seconds / k, 0.7)

    def caught_up(self, n: int, seconds: float) -> None:
        """The model draft read ``n`` unseen context tokens in ``seconds`` before drafting."""
        if n > 0:
            self.catch.add(n, seconds)

    def verified(self, n: int, seconds: float) -> None:
        self.verify.add(n, seconds)

    def accepted(self, source: str, n: int, k: int) -> None:
        self.alpha[source].add(n, n + (1 if n < k else 0))

    def shadow(self, proposal: list[int], emitted: list[int]) -> None:
        """Score a lookup proposal that was not drafted against the tokens the target emitted (free)."""
        j = 0
        while j < len(proposal) and j < len(emitted) and proposal[j] == emitted[j]:
            j += 1
        rejected = j < len(proposal) and j < len(emitted)  # past the emitted tokens the outcome is unknown
        self.alpha["lookup"].add(j, j + int(rejected))
        if "lookup" not in self.t_draft:
            self.t_draft["lookup"] = 0.0

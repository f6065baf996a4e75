"""Backend over a local transformers model (any spec :func:`slmkit.models.load` takes)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from slmkit.backends.base import Completion, GenParams, Prompt, TokenScores
from slmkit.backends.stream import OnText, TokenText, stop_index
from slmkit.backends.text import render_prompt, token_id_list, truncate_at_stop  # noqa: F401 (re-exported)


class HFBackend:
    """Generates with ``model.generate`` and scores with one forward pass per batch."""

    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "") or "local")
        self.batch_size = batch_size

    @classmethod
    def from_spec(cls, spec: str, dtype: str = "fp32", **kw) -> HFBackend:
        from slmkit.models import load

        model, tok = load(spec, dtype=dtype)
        return cls(model, tok, name=spec, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefix_id(self) -> int | None:
        """The token put before a text scored without context (BOS, else EOS)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        """Completions of ``prompts``, ``batch_size`` at a time (left-padded batches).

        Greedy output equals generating each prompt alone (up to fp32 round-off in the
        padded attention, which can only flip an exact near-tie). With ``seed`` set,
        prompt ``i`` samples from its own generator seeded ``seed + i`` (or ``seeds[i]``), so its text
        does not depend on which prompts share its batch.
        """
        out: list[Completion] = []
        for b in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[b : b + self.batch_size], params, b))
        return out

    @torch.inference_mode()
    def stream(self, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
        """Generate one completion, calling ``on_text`` with each new piece of text
        (see :mod:`slmkit.backends.stream`); stops early when ``on_text`` returns True."""
        eos = set(token_id_list(self.model.generation_config.eos_token_id) + token_id_list(self.tokenizer.eos_token_id))
        text = TokenText(self.tokenizer, params.stop, on_text, eos)
        c = self._generate_batch([prompt], params, 0, text)[0]
        text.close()
        return c

    def _eos_ids(self) -> set[int]:
        return set(token_id_list(self.model.generation_config.eos_token_id) + token_id_list(self.tokenizer.eos_token_id))

    def _token_masks(self, constraint, n: int) -> list:
        """One :class:`~slmkit.runtime.constrain.TokenMask` per row (llguidance's tokenizer built once per backend)."""
        from slmkit.runtime.constrain import TokenMask, compile_grammar, llg_tokenizer

        if getattr(self, "_lltok", None) is None:
            self._lltok = llg_tokenizer(self.tokenizer, self.model.config.get_text_config().vocab_size, self._eos_ids())
        grammar = compile_grammar(constraint)
        return [TokenMask(self._lltok, constraint, grammar=grammar) for _ in range(n)]

    def _encode(self, prompt: Prompt) -> list[int]:
        tok = self.tokenizer
        # chat templates already contain the special tokens they need
        ids = tok(render_prompt(tok, prompt), add_special_tokens=isinstance(prompt, str)).input_ids
        if not ids:
            pid = self.prefix_id()
            ids = [pid if pid is not None else 0]
        return ids

    def _generate_batch(self, prompts: Sequence[Prompt], params: GenParams, offset: int, text: TokenText | None = None) -> list[Completion]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        seqs = [self._encode(p) for p in prompts]
        B, L = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((B, L), pad if pad is not None else 0, dtype=torch.long)  # (B, L), left-padded
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, L - len(s) :] = torch.tensor(s)
            mask[i, L - len(s) :] = 1
        stops = _TextStops(tok, params.stop, L, (lambda: text.cancelled) if text is not None else None, B)
        kw = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            output_scores=params.logprobs,
            return_dict_in_generate=True,
            temperature=None, top_p=None, top_k=None,
            stopping_criteria=StoppingCriteriaList([stops]),
        )
        sampler = None
        procs = []
        if params.temperature > 0 and (params.seed is not None or params.seeds is not None or params.constraint is not None):
            seeds = [params.seed_for(offset + i) if params.seed is not None or params.seeds is not None
                     else int(torch.randint(0, 2**62, (1,))) for i in range(B)]
            sampler = _SeededSampling(params.temperature, params.top_p, seeds, params.logprobs)
            procs.append(sampler)
        if params.constraint is not None:  # masks first, then sampling (temperature and top-p see admitted tokens only)
            procs = [_Constrained(self._token_masks(params.constraint, B), self._eos_ids(), L + params.max_new_tokens, sampler)]
        elif params.temperature > 0 and sampler is None:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if procs:
            kw.update(logits_processor=LogitsProcessorList(procs))
        if text is not None:
            kw.update(streamer=_Streamer(text))
        res = self.model.generate(input_ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        eos = set(token_id_list(self.model.generation_config.eos_token_id) + token_id_list(tok.eos_token_id))
        steps = sampler.logp if sampler is not None else [torch.log_softmax(s.float(), -1) for s in (res.scores or ())]
        out = []
        for i in range(B):
            new = res.sequences[i, L:].tolist()
            n = len(new) if stops.end[i] is None else min(len(new), stops.end[i])
            hit_eos = False
            for j, t in enumerate(new[:n]):
                if t in eos:  # tokens after it are padding (or another row's steps)
                    n, hit_eos = j + 1, True
                    break
            body = new[: n - 1] if hit_eos else new[:n]
            gen_text, hit_stop = truncate_at_stop(tok.decode(body, skip_special_tokens=True), params.stop)
            lps = [float(steps[j][i, t]) for j, t in enumerate(new[:n])] if params.logprobs else None
            done = procs and params.constraint is not None and procs[0].masks[i].done
            reason = "stop" if (hit_eos or hit_stop or n < params.max_new_tokens or done) else "length"
            out.append(Completion(gen_text, n, reason, lps))
        return out

    @torch.inference_mode()
    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        """Log-probs of each text's tokens.

        Without contexts every token is scored, conditioned on a BOS/EOS prefix
        token (as lm-evaluation-harness' rolling log-likelihood does). With
        contexts, ``context + text`` is encoded as a whole and the text's
        tokens are those after the context's (lm-evaluation-harness'
        ``loglikelihood`` split).
        """
        if contexts is not None and len(contexts) != len(texts):
            raise ValueError("texts and contexts differ in length")
        seqs = [self.encode_pair(None if contexts is None else contexts[i], t) for i, t in enumerate(texts)]
        out: list[TokenScores] = []
        for b in range(0, len(seqs), self.batch_size):
            out.extend(self._score_batch(seqs[b : b + self.batch_size]))
        return out

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[tuple[list[int], int]]) -> list[TokenScores]:
        """Log-probs of ``ids[start:]`` for each ``(ids, start)`` (``start >= 1``): token ids already split
        into context and continuation, as lm-evaluation-harness' ``_loglikelihood_tokens`` takes them."""
        if any(start < 1 or start > len(ids) for ids, start in seqs):
            raise ValueError("score_ids needs 1 <= start <= len(ids) for every sequence")
        out: list[TokenScores] = []
        for b in range(0, len(seqs), self.batch_size):
            out.extend(self._score_batch(list(seqs[b : b + self.batch_size])))
        return out

    @torch.inference_mode()
    def score_choices(self, contexts: Sequence[str], choices: Sequence[Sequence[str]], prefix: str = "",
                      max_tokens: int = 1024) -> list[list[float]]:
        """Total log-likelihood of each of ``choices[i]`` as a continuation of ``contexts[i]``.

        The same numbers as :meth:`score` (lm-eval's split of context and continuation; equal up to
        float round-off, tested), at a fraction of the cost when contexts are long and choices many:
        each context runs once and its KV cache serves all of its choices, and ``prefix`` (a start the
        contexts share, e.g. a few-shot primer) runs once for all items. Items go in batches of at most
        ``max_tokens`` padded tokens per forward pass, items of like lengths together. An item whose
        choices do not share its context's tokens (a tokenizer with no BOS/EOS to lead an empty
        context) is scored whole.
        """
        from transformers import DynamicCache

        model, tok = self.model, self.tokenizer
        out: list[list[float] | None] = [None] * len(contexts)
        base, base_ids = None, []
        if prefix:  # the primer's tokens but its last, so that every context feeds at least one token
            base_ids = tok(prefix.rstrip(), add_special_tokens=False).input_ids[:-1]
            if base_ids:
                base = DynamicCache(config=model.config)
                base = model(input_ids=torch.tensor([base_ids], device=self.device), cache=base, use_cache=True).cache
        groups: dict[int, list[tuple[int, list[int], list[list[int]]]]] = {0: [], len(base_ids): []}
        for i, (ctx, chs) in enumerate(zip(contexts, choices)):
            pairs = [self.encode_pair(ctx, c) for c in chs]
            start = pairs[0][1]
            ctx_ids = pairs[0][0][:start]
            if any(s != start or ids[:start] != ctx_ids for ids, s in pairs):
                out[i] = [s.total for s in self._score_batch(pairs)]
                continue
            k = len(base_ids) if base is not None and ctx_ids[: len(base_ids)] == base_ids and len(ctx_ids) > len(base_ids) else 0
            groups[k].append((i, ctx_ids[k:], [ids[start:] for ids, _ in pairs]))
        for k, items in groups.items():
            items.sort(key=lambda x: (max(len(c) for c in x[2]), len(x[1])))  # like lengths share a batch: less padding
            batch: list = []
            for item in [*items, None]:
                if batch and (item is None or not _fits([*batch, item], max_tokens)):
                    for i, totals in zip((b[0] for b in batch), self._score_shared(batch, k, base)):
                        out[i] = totals
                    batch = []
                if item is not None:
                    batch.append(item)
        return out  # type: ignore[return-value]

    def _score_shared(self, items: list[tuple[int, list[int], list[list[int]]]], k: int, base) -> list[list[float]]:
        """One batch of :meth:`score_choices`: ``items`` are (index, context tokens after the first ``k``,
        continuations); ``base`` caches those ``k`` tokens (batch 1)."""
        import copy

        from transformers import DynamicCache

        model, dev = self.model, self.device
        pad = self.tokenizer.pad_token_id or 0
        G, T = len(items), max(len(r) for _, r, _ in items)
        ids = torch.full((G, T), pad, dtype=torch.long)  # (G, T): contexts left-padded, so their last tokens line up
        mask = torch.zeros((G, k + T), dtype=torch.long)
        pos = torch.full((G, T), k, dtype=torch.long)
        mask[:, :k] = 1
        for g, (_, rest, _) in enumerate(items):
            off = T - len(rest)
            ids[g, off:] = torch.tensor(rest)
            mask[g, k + off:] = 1
            pos[g, off:] = torch.arange(k, k + len(rest))
        cache = copy.deepcopy(base) if k else DynamicCache(config=model.config)
        if k:
            cache.batch_repeat_interleave(G)
        res = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), cache=cache, use_cache=True,
                    logits_to_keep=1)
        last = F.log_softmax(res.logits[:, -1].float(), -1)  # (G, V): each context's next-token log-probs
        rows = [(g, c) for g, (_, _, conts) in enumerate(items) for c in conts]
        totals = [float(last[g, c[0]]) for g, c in rows]
        L = max(len(c) for _, c in rows) - 1  # the last token of a continuation is predicted, never fed
        if L > 0:
            R = len(rows)
            sel = torch.tensor([g for g, _ in rows])
            cache = res.cache
            cache.batch_select_indices(sel.to(dev))  # each context's cache, once per choice
            inp = torch.full((R, L), pad, dtype=torch.long)  # (R, L): choices right-padded after their context
            mask2 = torch.cat([mask[sel], torch.zeros((R, L), dtype=torch.long)], 1)
            pos2 = torch.zeros((R, L), dtype=torch.long)
            for r, (g, c) in enumerate(rows):
                inp[r, : len(c) - 1] = torch.tensor(c[:-1])
                mask2[r, k + T : k + T + len(c) - 1] = 1
                pos2[r] = torch.arange(L) + k + len(items[g][1])
            logits = model(input_ids=inp.to(dev), attention_mask=mask2.to(dev), position_ids=pos2.to(dev), cache=cache,
                           use_cache=True).logits.float()  # (R, L, V)
            norm = torch.logsumexp(logits, -1)  # (R, L)
            for r, (_, c) in enumerate(rows):
                if len(c) > 1:
                    tgt = torch.tensor(c[1:], device=logits.device)
                    n = len(c) - 1
                    totals[r] += float((logits[r, :n].gather(-1, tgt[:, None])[:, 0] - norm[r, :n]).sum())
        per_item, r = [], 0
        for _, _, conts in items:
            per_item.append(totals[r : r + len(conts)])
            r += len(conts)
        return per_item

    @torch.inference_mode()
    def prompt_logprobs(self, text: str) -> tuple[list[str], list[float | None]]:
        """Tokens of ``text`` (tokenizer defaults) and their log-probs; the first has none (as in vLLM's echo)."""
        ids = self.tokenizer(text).input_ids
        first = self.tokenizer.convert_ids_to_tokens(ids[:1])
        if len(ids) < 2:
            return first, [None] * len(ids)
        s = self._score_batch([(ids, 1)])[0]
        return first + s.tokens, [None, *s.logprobs]

    def score_many(self, texts: Sequence[str], contexts: Sequence[str | None] | None = None) -> list[TokenScores]:
        """:meth:`score`'s numbers (up to rounding), faster for many texts: shared contexts are read once
        into a KV cache, short pairs packed into batches (:func:`slmkit.backends.hf_batch.score_many`)."""
        from slmkit.backends.hf_batch import score_many

        return score_many(self, texts, contexts)

    def sample(self, prompts: Sequence[Prompt], params: GenParams, samples: int = 1,
               batch_size: int = 32) -> list[list[Completion]]:
        """``samples`` completions of every prompt (a list per prompt), decoded in left-padded batches
        of ``batch_size`` rows (:func:`slmkit.backends.hf_batch.sample_batched`)."""
        from slmkit.backends.hf_batch import sample_batched

        return sample_batched(self, prompts, params, samples, batch_size)

    def encode_pair(self, context: str | None, text: str) -> tuple[list[int], int]:
        """``(ids, start)``: ``context + text`` encoded as :meth:`score` does, ``ids[start:]`` being the text's."""
        tok = self.tokenizer
        if context is None or context == "":
            ids = tok(text, add_special_tokens=False).input_ids
            pid = self.prefix_id()
            if pid is None:
                return ids, 1
            return [pid, *ids], 1
        # lm-eval moves trailing whitespace of the context onto the continuation
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, text = context[:-n_space], context[-n_space:] + text
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + text, add_special_tokens=False).input_ids
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return whole, len(ctx)
        return ctx + tok(text, add_special_tokens=False).input_ids, len(ctx)

    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[TokenScores]:
        L = max(len(ids) for ids, _ in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        res = []
        for i, (ids, start) in enumerate(batch):
            tgt = torch.tensor(ids[start:], device=logp.device)
            rows = logp[i, start - 1 : len(ids) - 1]  # position t predicts token t+1
            lp = rows.gather(-1, tgt[:, None])[:, 0]
            greedy = (rows.argmax(-1) == tgt).tolist()
            res.append(
                TokenScores(self.tokenizer.convert_ids_to_tokens(ids[start:]), lp.tolist(), greedy)
            )
        return res


def _fits(items: list, max_tokens: int) -> bool:
    """Whether a batch of :meth:`HFBackend.score_choices` items stays within ``max_tokens`` padded tokens per pass."""
    ctx = len(items) * max(len(r) for _, r, _ in items)
    conts = sum(len(c) for _, _, c in items) * max(len(x) for _, _, c in items for x in c)
    return len(items) == 1 or max(ctx, conts) <= max_tokens


class _TextStops(StoppingCriteria):
    """Stopping criterion: a row ends once its generated text contains a stop string
    (``end[i]`` records how many tokens it had then); every row ends when ``cancelled()``."""

    def __init__(self, tokenizer, stops: Sequence[str], start: int, cancelled, batch: int):
        self.tok, self.stops, self.start, self.cancelled = tokenizer, tuple(s for s in stops if s), start, cancelled
        self.end: list[int | None] = [None] * batch

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        B, T = input_ids.shape
        if self.cancelled is not None and self.cancelled():
            self.end = [T - self.start if e is None else e for e in self.end]
        elif self.stops:
            for i in range(B):
                if self.end[i] is None and stop_index(self.tok.decode(input_ids[i, self.start :], skip_special_tokens=True), self.stops) >= 0:
                    self.end[i] = T - self.start
        return torch.tensor([e is not None for e in self.end], device=input_ids.device)


class _Constrained(LogitsProcessor):
    """Logits processor: row ``i``'s logits masked by ``masks[i]`` (a grammar, slmkit.runtime.constrain).

    Each call first feeds every row's last sampled token to its mask (not on the first call: the
    prompt); a row that ended (EOS) or whose grammar is complete is left alone (transformers pads it).
    """

    def __init__(self, masks: list, eos: set[int], end: int, sampler: _SeededSampling | None = None):
        self.masks, self.eos, self.end = masks, eos, end  # end: the padded prompt length + max_new_tokens
        self.sampler = sampler  # samples after masking (else greedy); a pick is vetted by its mask (close-out)
        self.started = False
        self.ended = [False] * len(masks)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, m in enumerate(self.masks):
            if self.ended[i]:
                continue
            if self.started:
                last = int(input_ids[i, -1])
                if last in self.eos:
                    self.ended[i] = True
                    continue
                m.accept(last)  # a complete grammar then admits EOS alone
            m.apply(scores[i], self.end - input_ids.shape[1])
        self.started = True
        if self.sampler is not None:
            scores = self.sampler(input_ids, scores)  # (B, V): 0 at the sampled token, -inf elsewhere
        picks = scores.argmax(-1).tolist()
        for i, m in enumerate(self.masks):
            if not self.ended[i]:
                t = m.vet(picks[i], self.end - input_ids.shape[1])
                if t != picks[i]:
                    scores[i] = -math.inf
                    scores[i, t] = 0.0
        return scores


class _SeededSampling(LogitsProcessor):
    """Logits processor that samples row ``i`` with its own ``torch.Generator`` (seed ``seeds[i]``)
    after temperature and top-p, and leaves only the sampled token finite, so greedy selection
    picks it. A row's sample then does not depend on the other rows of its batch.
    ``logp`` keeps each step's (B, V) log-probs after temperature and top-p (when ``keep_logp``)."""

    def __init__(self, temperature: float, top_p: float, seeds: list[int], keep_logp: bool = False):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.seeds = seeds
        self.gens: list[torch.Generator] | None = None
        self.keep_logp = keep_logp
        self.logp: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        if self.gens is None:
            self.gens = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = F.softmax(scores.float(), -1)  # (B, V)
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(self.gens)])  # (B,)
        if self.keep_logp:  # only when log-probs were asked for: a (B, V) pass per step otherwise wasted
            self.logp.append(F.log_softmax(scores.float(), -1))
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(scores.shape[0], device=scores.device), picks] = 0.0
        return out


class _Streamer(BaseStreamer):
    """transformers streamer: the first ``put`` is the prompt, then one (1,) tensor per step."""

    def __init__(self, text: TokenText):
        self.text, self.prompt_seen = text, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.text.push(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

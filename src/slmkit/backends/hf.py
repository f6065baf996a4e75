"""Backend over a local transformers model (any spec :func:`slmkit.models.load` takes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slmkit.backends.base import Completion, GenParams, Prompt, TokenScores
from slmkit.errors import UnsupportedModelError


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Raw text stays as is; a chat is rendered with the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedModelError(
            "this model's tokenizer has no chat template, so chat messages cannot be formatted",
            "pass raw text prompts, or use an instruction-tuned model",
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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

    def _prefix_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        tok = self.tokenizer
        out = []
        for i, prompt in enumerate(prompts):
            text = render_prompt(tok, prompt)
            # chat templates already contain the special tokens they need
            ids = tok(text, return_tensors="pt", add_special_tokens=isinstance(prompt, str)).input_ids
            if ids.shape[1] == 0:
                pid = self._prefix_id()
                ids = torch.tensor([[pid if pid is not None else 0]])
            ids = ids.to(self.device)
            kw = dict(
                max_new_tokens=params.max_new_tokens,
                do_sample=params.temperature > 0,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                output_scores=params.logprobs,
                return_dict_in_generate=True,
            )
            if params.temperature > 0:
                kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            if params.stop:
                kw.update(stop_strings=list(params.stop), tokenizer=tok)
            with torch.random.fork_rng(devices=[]):
                if params.seed is not None:
                    torch.manual_seed(params.seed + i)
                res = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            new = res.sequences[0, ids.shape[1] :]
            eos = set(_as_list(self.model.generation_config.eos_token_id) + _as_list(tok.eos_token_id))
            n = len(new)
            hit_eos = n > 0 and int(new[-1]) in eos
            body = new[:-1] if hit_eos else new
            gen_text = tok.decode(body, skip_special_tokens=True)
            gen_text, hit_stop = _truncate_at_stop(gen_text, params.stop)
            lps = None
            if params.logprobs:
                lps = [
                    float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(res.scores, new.tolist())
                ]
            reason = "stop" if (hit_eos or hit_stop or n < params.max_new_tokens) else "length"
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
        seqs = [self._encode_pair(None if contexts is None else contexts[i], t) for i, t in enumerate(texts)]
        out: list[TokenScores] = []
        for b in range(0, len(seqs), self.batch_size):
            out.extend(self._score_batch(seqs[b : b + self.batch_size]))
        return out

    @torch.inference_mode()
    def prompt_logprobs(self, text: str) -> tuple[list[str], list[float | None]]:
        """Tokens of ``text`` (tokenizer defaults) and their log-probs; the first has none (as in vLLM's echo)."""
        ids = self.tokenizer(text).input_ids
        first = self.tokenizer.convert_ids_to_tokens(ids[:1])
        if len(ids) < 2:
            return first, [None] * len(ids)
        s = self._score_batch([(ids, 1)])[0]
        return first + s.tokens, [None, *s.logprobs]

    def _encode_pair(self, context: str | None, text: str) -> tuple[list[int], int]:
        tok = self.tokenizer
        if context is None or context == "":
            ids = tok(text, add_special_tokens=False).input_ids
            pid = self._prefix_id()
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


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]

"""A :class:`~slmkit.backends.Backend` over the fast path (``slmkit generate --fast``, library users)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from slmkit.backends.base import Completion, GenParams, Prompt, TokenScores
from slmkit.backends.hf import HFBackend, render_prompt
from slmkit.runtime.decoding import stream
from slmkit.runtime.generate import FastConfig


class FastBackend:
    """Generates with :func:`slmkit.runtime.decoding.stream` (KV policy per backend); scores like :class:`HFBackend`.

    With ``gguf`` (the file ``model`` was loaded from) the fast model runs the file's own quantised
    blocks (:func:`slmkit.runtime.gguffast.build_gguf`) instead of ``model``'s dequantised weights. A model
    whose architecture :mod:`slmkit.runtime.arch` does not describe generates through its own forward
    (:func:`slmkit.runtime.generate.runner`: slower, same output).
    """

    def __init__(self, model, tokenizer, cfg: FastConfig = FastConfig(), name: str | None = None,
                 kv: str = "full", kv_budget: int | None = None, gguf: str | Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if gguf is not None:
            from slmkit.runtime.gguffast import build_gguf

            self.fm = build_gguf(gguf, cfg, model)
        else:  # an architecture the fast path does not describe: one warning line, then transformers' forward
            from slmkit.runtime.gguffast import fast_runner

            self.fm = fast_runner(model, cfg)  # an fp32 model loaded from a GGUF file: that file's blocks in full precision
        self.name = name or str(getattr(model.config, "name_or_path", "") or "local")
        self.kv, self.kv_budget = kv, kv_budget
        self._lltok = None  # llguidance's tokenizer, built on the first constrained request (~1 s)
        self._pool = None  # one worker thread computing the next token mask during the forward pass

    @classmethod
    def from_spec(cls, spec: str, dtype: str | None = None, weights: str = "native", kv: str = "full",
                  kv_budget: int | None = None) -> FastBackend:
        """The fast path over ``spec`` (``slmkit generate --fast``): a quantised FILE.gguf or packed DIR runs its
        own codes unless ``dtype`` is given; ``weights`` native|int8|int4; streaming/h2o keep 1024 tokens by default."""
        from slmkit.models import load
        from slmkit.runtime.gguffast import file_codes

        gguf = file_codes(spec, dtype, weights)
        cfg = FastConfig(dtype="bf16" if dtype in ("bf16", "bfloat16") else "fp32", weights=weights)
        model, tok = load(spec, dtype=dtype or "fp32")
        if kv in ("streaming", "h2o") and kv_budget is None:
            kv_budget = 1024
        return cls(model, tok, cfg, name=spec, kv=kv, kv_budget=kv_budget, gguf=gguf)

    def token_mask(self, constraint):
        """A :class:`~slmkit.runtime.constrain.TokenMask` for one sequence under ``constraint``."""
        from concurrent.futures import ThreadPoolExecutor

        from slmkit.runtime.constrain import TokenMask, llg_tokenizer

        if self._lltok is None:
            self._lltok = llg_tokenizer(self.tokenizer, self.fm.vocab, self.fm.eos)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="slmkit-mask")
        return TokenMask(self._lltok, constraint, self._pool)

    def encode(self, prompt: Prompt) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok(render_prompt(tok, prompt), add_special_tokens=isinstance(prompt, str)).input_ids
        if not ids:
            pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [pid if pid is not None else 0]
        return torch.tensor(ids, dtype=torch.long)

    def stream_text(self, prompt: Prompt, params: GenParams, seed_offset: int = 0):
        """Yield (text_delta, token, logprob) per generated token, then ("", None, None, finish_reason).

        EOS and stop strings end the text and are not part of it; EOS still counts as a generated token.
        """
        mask = self.token_mask(params.constraint) if params.constraint is not None else None
        ids = self.encode(prompt)
        ctx = min(self.fm.max_positions, len(ids) + params.max_new_tokens)
        cache = self.fm.new_cache(self.kv, context=ctx, budget=self.kv_budget)
        seed = params.seed_for(seed_offset)
        out: list[int] = []
        sent = 0
        hold = max((len(s) for s in params.stop), default=1) - 1
        eos = False
        for step in stream(self.fm, ids, params.max_new_tokens, params.temperature, params.top_p, seed, cache, mask=mask):
            if step.token in self.fm.eos:
                eos = True
                yield "", step.token, step.logprob
                break
            out.append(step.token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in params.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                yield text[sent:cut], step.token, step.logprob
                yield "", None, None, "stop"
                return
            end = max(sent, len(text) - hold)
            while end > sent and text[end - 1] == "\ufffd":
                end -= 1
            yield text[sent:end], step.token, step.logprob
            sent = end
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        yield text[sent:], None, None
        done = eos or len(out) < params.max_new_tokens or (mask is not None and mask.done)
        yield "", None, None, "stop" if done else "length"

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        res = []
        for i, prompt in enumerate(prompts):
            pieces, lps, reason = [], [], "length"
            for item in self.stream_text(prompt, params, i):
                pieces.append(item[0])
                if item[1] is not None:
                    lps.append(item[2])
                if len(item) == 4:
                    reason = item[3]
            res.append(Completion("".join(pieces), len(lps), reason, lps if params.logprobs else None))
        return res

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        return HFBackend(self.model, self.tokenizer, name=self.name).score(texts, contexts)

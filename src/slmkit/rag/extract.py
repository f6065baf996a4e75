"""Extractive answers: the span of a retrieved passage that the model itself scores highest as the answer.

The model reads the numbered sources and the question (the same layout as generated answers) and
every candidate span ``s`` is scored by the model's own log-probability of ``s`` followed by the end
of its turn, ``log p(s + END | prompt)``: the probability that ``s`` is the whole answer. The end
marker is what keeps the choice honest about length (a span cut too short or run on past the answer
is a less likely complete answer), so no length bonus is needed. This is zero-shot extractive QA by
answer likelihood, the scoring lm-evaluation-harness uses for multiple choice
(Gao et al. 2021) with the passage's spans as the choices; the generative readers of
Izacard & Grave 2021 (FiD) and the span-constrained decoding of Lewis et al. 2020 (RAG) pick
answers the same way.

Candidates are found in two stages, so that the model scores about a hundred spans, not every
n-gram: (1) one forward pass over the prompt gives the log-probability of each passage word as the
answer's first token; the ``starts`` most likely distinct words are kept (their first ``positions``
occurrences); (2) every span of 1 to ``max_words`` words starting there (within its sentence) is
scored in full, with the prompt's KV cache shared (:meth:`~slmkit.backends.hf.HFBackend.score_choices`).

The support of the chosen span is its mean log-probability per token (``score``); below
``min_score`` the span is not trusted (see :func:`slmkit.rag.answer.answer` for the generated
fallback and the abstention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from slmkit.errors import ConfigError

SYSTEM_EXTRACT = ("Answer the question with a short phrase copied exactly from the numbered sources. "
                  "Reply with the phrase only.")
_WORD = re.compile(r"\S+")
_LEAD = "\"'([{“‘«"
_TRAIL = ".,;:!?\"')]}”’»"
_SENTENCE_END = (".", "!", "?", ";")


@dataclass(frozen=True)
class ExtractConfig:
    max_words: int = 8  #: longest candidate span, in words
    starts: int = 12  #: distinct start words kept after the first-token pass
    positions: int = 3  #: occurrences of each start word expanded (the first ones, in source order)
    min_score: float = -2.5  #: mean log-prob per token (nats) below which a span is not trusted
    max_source_chars: int = 2000  #: each source is cut to this many characters in the prompt
    batch_tokens: int = 512  #: padded continuation tokens per scoring pass (bounds memory: one KV copy per span)

    def __post_init__(self):
        if min(self.max_words, self.starts, self.positions) < 1 or self.batch_tokens < 16:
            raise ConfigError(f"max_words, starts and positions must be >= 1 and batch_tokens >= 16, got "
                              f"{self.max_words}, {self.starts}, {self.positions}, {self.batch_tokens}")


@dataclass
class Span:
    source: int  #: index of the source (hit) the span is in
    start: int  #: character offsets into that source's text
    end: int
    text: str
    logprob: float  #: log p(text + END | prompt), nats
    tokens: int  #: tokens scored (span and end marker)

    @property
    def score(self) -> float:
        """Mean log-probability per token: the support the model gives this span."""
        return self.logprob / max(self.tokens, 1)


def words(text: str) -> list[tuple[int, int, bool]]:
    """``(start, end, ends_sentence)`` of each word, surrounding punctuation excluded."""
    out = []
    for m in _WORD.finditer(text):
        a, b = m.start(), m.end()
        raw = m.group()
        while a < b and text[a] in _LEAD:
            a += 1
        while b > a and text[b - 1] in _TRAIL:
            b -= 1
        if a < b:
            out.append((a, b, raw.endswith(_SENTENCE_END)))
    return out


def _close(text: str, start: int, end: int) -> int:
    """``end`` moved past a closing bracket the span opened (``"12 Ma (ICS 2004"`` -> ``"... 2004)"``)."""
    if text.count("(", start, end) > text.count(")", start, end) and end < len(text) and text[end] == ")":
        return end + 1
    return end


def candidates(sources: list[str], starts: set[tuple[int, int]], max_words: int) -> list[tuple[int, int, int]]:
    """``(source, start, end)`` of the spans of 1..max_words words from each ``(source, word)`` start,
    not crossing a sentence end; duplicates of the same text keep the earliest source."""
    seen: set[str] = set()
    out = []
    for si, text in enumerate(sources):
        ws = words(text)
        for wi, (a, _, _) in enumerate(ws):
            if (si, wi) not in starts:
                continue
            for wj in range(wi, min(wi + max_words, len(ws))):
                end = _close(text, a, ws[wj][1])
                span = text[a:end]
                if span not in seen:
                    seen.add(span)
                    out.append((si, a, end))
                if ws[wj][2]:
                    break
    return out


def end_marker(tokenizer, chat: bool) -> str:
    """What ends an assistant turn in the chat template (e.g. ``<|im_end|>``); a newline for raw prompts."""
    if not chat:
        return "\n"
    probe = "QQQ7"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = text[text.rfind(probe) + len(probe):].strip()
    return after.split()[0] if after else (tokenizer.eos_token or "\n")


def extract_prompt(tokenizer, question: str, sources: list[str], cfg: ExtractConfig) -> tuple[str, bool]:
    """The prompt text (chat template applied when the tokenizer has one) and whether it is a chat."""
    from slmkit.backends.hf import render_prompt

    listed = "\n\n".join(f"[{i}] {s[: cfg.max_source_chars]}" for i, s in enumerate(sources, 1))
    user = f"Sources:\n{listed}\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, [{"role": "system", "content": SYSTEM_EXTRACT}, {"role": "user", "content": user}]), True
    return f"{SYSTEM_EXTRACT}\n\n{user}\nAnswer:", False


@torch.inference_mode()
def _first_token_logprobs(backend, prompt: str) -> torch.Tensor:
    """(V,) log-probabilities of the token after ``prompt``."""
    tok, model = backend.tokenizer, backend.model
    ids = tok(prompt, add_special_tokens=False).input_ids
    dev = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=dev), logits_to_keep=1).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def best_span(backend, question: str, sources: list[str], cfg: ExtractConfig = ExtractConfig()) -> Span | None:
    """The span of ``sources`` the model scores highest as the complete answer (None: no words)."""
    if not (hasattr(backend, "score_choices") and hasattr(backend, "model")):
        raise ConfigError("extractive answers need a local model (spans are scored with its log-probabilities)",
                          "pass --model default, a hub id or a directory, not an endpoint")
    tok = backend.tokenizer
    sources = [s[: cfg.max_source_chars] for s in sources]
    prompt, chat = extract_prompt(tok, question, sources, cfg)
    lead = "" if chat else " "
    first = _first_token_logprobs(backend, prompt)  # stage 1: the answer's first token
    by_word: dict[str, float] = {}
    where: dict[str, list[tuple[int, int]]] = {}
    for si, text in enumerate(sources):
        for wi, (a, b, _) in enumerate(words(text)):
            w = text[a:b]
            if w not in by_word:
                ids = tok(lead + w, add_special_tokens=False).input_ids
                by_word[w] = float(first[ids[0]]) if ids else float("-inf")
            where.setdefault(w, []).append((si, wi))
    if not by_word:
        return None
    keep = sorted(by_word, key=lambda w: -by_word[w])[: cfg.starts]
    starts = {pos for w in keep for pos in where[w][: cfg.positions]}
    cands = candidates(sources, starts, cfg.max_words)
    end = end_marker(tok, chat)
    texts = [lead + sources[si][a:b] + end for si, a, b in cands]
    per = max(1, cfg.batch_tokens // 16)  # stage 2: spans in groups; the prompt's cache is shared (prefix)
    groups = [texts[i: i + per] for i in range(0, len(texts), per)]
    totals = [t for g in backend.score_choices([prompt] * len(groups), groups, prefix=prompt,
                                               max_tokens=cfg.batch_tokens) for t in g]
    best = max(range(len(cands)), key=lambda i: (totals[i], -i))
    si, a, b = cands[best]
    n = len(tok(texts[best], add_special_tokens=False).input_ids)
    return Span(si, a, b, sources[si][a:b], float(totals[best]), n)

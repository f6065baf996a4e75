"""Extractive answers: the span of a retrieved passage that the model itself scores highest as the answer.

Two methods, chosen by :attr:`ExtractConfig.method` (registry :data:`SPAN_METHODS`):

* ``score`` (:func:`best_span`): likelihood ranking of candidate spans, described below;
* ``decode`` (:func:`decode_span`): greedy decoding constrained to copy a passage, described there;
* ``decode-each`` (:func:`decode_each_span`): the same on each passage alone, the best-supported span kept.

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
from dataclasses import dataclass, replace

import torch

from slmkit.errors import ConfigError
from slmkit.registry import Registry

#: the instruction of generated RAG answers (and of ``sft --rag`` training conversations)
SYSTEM_RAG = (
    "Answer the question using the numbered sources. Reply with a short answer, then cite the "
    "sources you used like [1]. If the sources do not contain the answer, say you do not know."
)
SYSTEM_EXTRACT = ("Answer the question with a short phrase copied exactly from the numbered sources. "
                  "Reply with the phrase only.")
_WORD = re.compile(r"\S+")
_LEAD = "\"'([{“‘«"
_TRAIL = ".,;:!?\"')]}”’»"
_SENTENCE_END = (".", "!", "?", ";")


#: name -> ``fn(backend, question, sources, cfg) -> Span | None``
SPAN_METHODS: Registry = Registry("extractive method")


@dataclass(frozen=True)
class ExtractConfig:
    method: str = "score"  #: a name in SPAN_METHODS: score (rank candidate spans), decode / decode-each (constrained copy)
    max_words: int = 8  #: longest candidate span, in words
    starts: int = 12  #: distinct start words kept after the first-token pass
    positions: int = 3  #: occurrences of each start word expanded (the first ones, in source order)
    min_score: float = -2.5  #: mean log-prob per token (nats) below which a span is not trusted
    max_source_chars: int = 2000  #: each source is cut to this many characters in the prompt
    batch_tokens: int = 512  #: padded continuation tokens per scoring pass (bounds memory: one KV copy per span)
    max_tokens: int = 32  #: decode: longest span, in tokens

    def __post_init__(self):
        SPAN_METHODS.get(self.method)
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
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


def source_messages(question: str, sources: list[str], system: str, max_chars: int) -> list[dict]:
    """Chat messages: ``system``, then the numbered sources (``[1] ...``, each cut to ``max_chars``) and the question."""
    listed = "\n\n".join(f"[{i}] {s[: max_chars]}" for i, s in enumerate(sources, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Sources:\n{listed}\n\nQuestion: {question}"}]


def extract_prompt(tokenizer, question: str, sources: list[str], cfg: ExtractConfig,
                   system: str = SYSTEM_EXTRACT) -> tuple[str, bool]:
    """The prompt text (chat template applied when the tokenizer has one) and whether it is a chat."""
    from slmkit.backends.hf import render_prompt

    messages = source_messages(question, sources, system, cfg.max_source_chars)
    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, messages), True
    return f"{system}\n\n{messages[1]['content']}\nAnswer:", False


@torch.inference_mode()
def _first_token_logprobs(backend, prompt: str) -> torch.Tensor:
    """(V,) log-probabilities of the token after ``prompt``."""
    tok, model = backend.tokenizer, backend.model
    ids = tok(prompt, add_special_tokens=False).input_ids
    dev = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=dev), logits_to_keep=1).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def _local(backend) -> None:
    if not (hasattr(backend, "score_choices") and hasattr(backend, "model")):
        raise ConfigError("extractive answers need a local model (spans are scored with its log-probabilities)",
                          "pass --model default, a hub id or a directory, not an endpoint")


@SPAN_METHODS.register("score")
def best_span(backend, question: str, sources: list[str], cfg: ExtractConfig | None = None) -> Span | None:
    """The span of ``sources`` the model scores highest as the complete answer (None: no words)."""
    _local(backend)
    cfg = cfg or ExtractConfig()
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


def find_span(backend, question: str, sources: list[str], cfg: ExtractConfig) -> Span | None:
    """The answer span of ``cfg.method``."""
    return SPAN_METHODS.get(cfg.method)(backend, question, sources, cfg)


_SPACE_MARKS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spellings of a leading space


def _bare(tok, tid: int) -> int | None:
    """The id of token ``tid`` without its leading space (``"Ġorange"`` -> ``"orange"``), None when the
    vocabulary has no such token: a reply opens with the bare form of a word that follows a space in the source."""
    piece = tok.convert_ids_to_tokens(tid)
    if not isinstance(piece, str) or len(piece) < 2 or not piece.startswith(_SPACE_MARKS):
        return None
    bare = tok.convert_tokens_to_ids(piece[1:])
    return bare if isinstance(bare, int) and bare != tok.unk_token_id else None


def _stop_ids(tok, chat: bool) -> set[int]:
    """Tokens that end a copied span: the end of the turn (and eos), a newline, a citation's opening bracket."""
    out = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for text in (end_marker(tok, chat), "\n", " [", "["):
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) == 1:
            out.add(ids[0])
    return out


def _token_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span in it."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc.input_ids, [tuple(o) for o in enc.offset_mapping]
    ids = tok(text, add_special_tokens=False).input_ids  # slow tokenizers: each token's text found in order
    offsets, prev = [], 0
    for t in ids:
        piece = tok.decode([t]).strip()
        at = text.find(piece, prev) if piece else -1
        offsets.append((at, at + len(piece)) if at >= 0 else (prev, prev))
        prev = at + len(piece) if at >= 0 else prev
    return ids, offsets


@SPAN_METHODS.register("decode")
@torch.inference_mode()
def decode_span(backend, question: str, sources: list[str], cfg: ExtractConfig | None = None) -> Span | None:
    """The answer the model writes when every token it may write continues a copy of a source.

    Greedy decoding with the prompt of generated RAG answers (:data:`SYSTEM_RAG` and the sources cut to
    ``cfg.max_source_chars``: the layout ``sft --rag`` trains with default settings; a ``RAGConfig.system``
    override does not reach it), where the first token may be any source token (or its form without the leading space)
    and each later one must extend a run of tokens that occurs in some source, or end the span (end of
    turn, newline, or a citation bracket); the model's unconstrained log-probabilities pick among the
    allowed tokens. This is the span-constrained decoding of generative readers, with the set of
    allowed continuations kept as a prefix trie over the sources (as GENRE's constrained beam search,
    De Cao et al. 2021, arXiv:2010.00904, keeps one over entity names); the span is located by the
    token offsets of the run it copied. ``Span.logprob`` sums the chosen tokens' log-probabilities and
    the end's under the unconstrained model, so ``score`` is comparable with ``min_score``.
    """
    _local(backend)
    cfg = cfg or ExtractConfig(method="decode")
    tok, model = backend.tokenizer, backend.model
    sources = [s[: cfg.max_source_chars] for s in sources]
    tables = [_token_offsets(tok, s) for s in sources]
    bare: dict[int, int | None] = {}
    follow: dict[int, list[tuple[int, int]]] = {}  # allowed token -> (source, index of the token after it)
    for si, (ids, _) in enumerate(tables):
        for p, t in enumerate(ids):
            follow.setdefault(t, []).append((si, p + 1))
            if t not in bare:
                bare[t] = _bare(tok, t)
            if bare[t] is not None and bare[t] != t:
                follow.setdefault(bare[t], []).append((si, p + 1))
    prompt, chat = extract_prompt(tok, question, sources, cfg, system=SYSTEM_RAG)
    stops = _stop_ids(tok, chat)
    if not set(follow) - stops:
        return None
    dev = next(model.parameters()).device
    step_ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids], device=dev)
    past, picked, total, at = None, [], 0.0, []
    while True:
        out = model(input_ids=step_ids, cache=past, use_cache=True, logits_to_keep=1)
        past = out.cache
        logp = torch.log_softmax(out.logits[0, -1].float(), -1)
        room = len(picked) < cfg.max_tokens
        if picked:
            allowed = (list(follow) if room else []) + sorted(stops)
        else:  # a span opens with a copied token, never with what ends one
            allowed = [t for t in follow if t not in stops]
        if not allowed:  # the copy reached the end of its sources and nothing ends a turn in one token
            break
        choice = torch.tensor(allowed, device=logp.device)
        t = int(choice[int(logp[choice].argmax())])
        total += float(logp[t])
        if picked and t in stops:
            break
        picked.append(t)
        at = follow[t]
        follow = {}
        for si, p in at:
            if p < len(tables[si][0]):
                follow.setdefault(tables[si][0][p], []).append((si, p + 1))
        step_ids = torch.tensor([[t]], device=dev)
    si, end_tok = at[0]
    offsets = tables[si][1]
    start, end = offsets[end_tok - len(picked)][0], offsets[end_tok - 1][1]
    text = sources[si]
    while start < end and text[start].isspace():
        start += 1
    return Span(si, start, end, text[start:end], total, len(picked) + 1)


@SPAN_METHODS.register("decode-each")
def decode_each_span(backend, question: str, sources: list[str], cfg: ExtractConfig | None = None) -> Span | None:
    """:func:`decode_span` on each source alone; the span with the highest mean log-probability per token wins.

    Reading one passage at a time spares a small model the search across passages (at the cost of one
    prompt and one decoding per source); the passages' answers are compared by the model's own support for them, as extractive
    readers over many passages pick the best-scored paragraph answer (BERTserini, Yang et al. 2019,
    arXiv:1902.01718, without the retriever's score)."""
    best = None
    for si, source in enumerate(sources):
        span = decode_span(backend, question, [source], cfg)
        if span is not None and (best is None or span.score > best.score):
            best = replace(span, source=si)
    return best

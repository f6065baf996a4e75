"""Constrained decoding: a JSON schema, a regular expression or a context-free grammar as a token mask.

At every decoding step a grammar engine computes which tokens keep the output a prefix of some
string of the language; every other logit is set to -inf before sampling, so the output is valid
by construction (the token masking of Willard & Louf 2023, "Efficient Guided Generation for Large
Language Models", arXiv:2307.09702; an Earley parser over lexemes for context-free grammars).

The engine is llguidance (guidance-ai; the grammar engine behind llama.cpp's ``LLAMA_LLGUIDANCE``
build and one of vLLM's structured-output backends). Chosen over xgrammar because its CPU wheel has
no dependencies (xgrammar's pulls triton and apache-tvm-ffi beside torch), and over outlines-core
because it takes context-free grammars (Lark, and GBNF converted) besides JSON schema and regex and
reports unsatisfiable schemas (``"minimum" > "maximum"``, an empty ``enum``) instead of hanging.
A mask costs tens of microseconds per token; :class:`TokenMask` computes the next one on a worker
thread while the model runs the previous token (llguidance drops the GIL), so a decode step waits for
it only when the model was faster.

Pieces: :class:`Constraint` (what the output must match: frozen, checked when built),
:func:`llg_tokenizer` (the tokenizer as llguidance needs it: built once per model, ~1 s for 49k tokens),
:class:`TokenMask` (one sequence's parser state: ``apply(logits)`` before sampling, ``accept(token)``
after). JSON schemas compile with compact separators (``{"a":1,"b":[2,3]}``): a model may not pad the
output with whitespace for ever.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import torch

from slmkit.errors import ConfigError, UnsupportedModelError

KINDS = ("json_schema", "regex", "grammar")
#: llguidance's JSON compiler options: no free whitespace (a random or weak model would fill the budget with it)
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(ConfigError):
    """A grammar or schema that cannot be used, or that admits no (further) output."""


def check_schema(schema, what: str = "JSON schema") -> dict | bool:
    """``schema`` (a dict, or JSON text) checked against its JSON Schema meta-schema; raises :class:`ConstraintError`."""
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise ConstraintError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{what} must be a JSON object (or true/false), got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        raise ConstraintError(f"{what} is not a valid JSON schema{f' at {where}' if where else ''}: {err.message}") from None
    return schema


@dataclass(frozen=True)
class Constraint:
    """What generated text must match.

    ``kind``: ``json_schema`` (``source`` is the schema as JSON text), ``regex`` (Rust regex syntax,
    matched against the whole output) or ``grammar`` (Lark, llguidance's dialect with ``%json``, or
    llama.cpp's GBNF). Build with :meth:`json_schema`, :meth:`regex`, :meth:`grammar`; a bad schema
    raises here, a bad regex or grammar when compiled (:func:`compile_grammar`).
    """

    kind: str
    source: str
    name: str = "constraint"  #: what error messages call it (a file name, a request field)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ConfigError(f"{self.name} must be text, got {type(self.source).__name__}")
        if self.kind == "json_schema":
            check_schema(self.source, self.name)

    @classmethod
    def json_schema(cls, schema: dict | bool | str, name: str = "JSON schema") -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), name)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"}, "json_object")

    @classmethod
    def regex(cls, pattern: str, name: str = "regex") -> Constraint:
        return cls("regex", pattern, name)

    @classmethod
    def grammar(cls, text: str, name: str = "grammar") -> Constraint:
        return cls("grammar", text, name)


def compile_grammar(c: Constraint) -> str:
    """The llguidance grammar of ``c`` (not yet checked against a tokenizer: see :class:`TokenMask`)."""
    import llguidance as llg

    if c.kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(c.source, defaults=JSON_OPTIONS)
    if c.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(c.source)
    try:
        return llg.grammar_from("grammar", c.source)  # Lark, or GBNF converted to Lark
    except ValueError as err:
        raise ConstraintError(f"{c.name} is neither a Lark nor a GBNF grammar: {_first(str(err))}") from None


def llg_tokenizer(tokenizer, n_vocab: int | None = None, eos: Iterable[int] = ()):
    """llguidance's view of a Hugging Face fast tokenizer; ``n_vocab``: the model's logits width, ``eos``: every id that ends a sequence."""
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise UnsupportedModelError(f"constrained decoding needs a fast (Rust) tokenizer; this model has {type(tokenizer).__name__}")
    ids = sorted({int(e) for e in eos} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    n = max(n_vocab or 0, len(tokenizer))
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n, eos_token=ids or None)


#: characters the close-out search tries, in this order: closers first, then the cheapest values and separators
CLOSE_CHARS = '"}]),:0[{tfnrueals1 .-_' + "".join(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                    if c not in "tfnrueals01") + "\n<>/=;'()+*#!?"
CLOSE_WINDOW = 64  #: tokens before the budget ends from which the close-out is planned at each step
CLOSE_NODES = 4000  #: characters tried per close-out search at most
CLOSE_SLACK = 16  #: plan at every step once the budget left is within this many tokens of the last plan (else every 8th)


def _first(msg: str) -> str:
    return " ".join(msg.strip().splitlines()[:3])[:300]


class TokenMask:
    """One sequence's constraint: :meth:`apply` masks the logits of the next token, :meth:`accept` feeds the chosen one.

    ``pool`` (optional) computes the next mask on a worker thread as soon as a token is accepted, so the
    work overlaps the model's next forward pass; without it masks are computed when needed.
    Raises :class:`ConstraintError` when the grammar is invalid, admits no output at all, or (a grammar
    with a dead end) admits no continuation of what was generated.
    """

    def __init__(self, lltok, c: Constraint, pool: Executor | None = None, grammar: str | None = None, close: bool = True):
        import llguidance as llg

        self.c, self.pool = c, pool
        self.matcher = llg.LLMatcher(lltok, grammar or compile_grammar(c), log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"{c.name} cannot be used: {_first(self.matcher.get_error())}")
        self.vocab = lltok.vocab_size
        self.eos = torch.tensor(list(lltok.eos_tokens), dtype=torch.long)
        self.bits = torch.full(((self.vocab + 31) // 32,), -1, dtype=torch.int32)  # one bit per token id
        self.tokens = 0  # tokens accepted so far
        self.close = close  # finish the output within the token budget (see apply)
        self.lltok = lltok
        self.forced = b""  # the planned close-out still to emit (bytes)
        self._ok: torch.Tensor | None = None  # the last mask (apply)
        self.closing = False  # a close-out was planned: once it is emitted, only EOS
        self._chars = [t[0] for t in (lltok.tokenize_str(ch) for ch in CLOSE_CHARS) if len(t) == 1]
        # UTF-8 continuation bytes last: a character the model left half-written must be finished first
        self._chars += [t[0] for t in (lltok.tokenize_bytes(bytes([b])) for b in range(0x80, 0xC0)) if len(t) == 1]
        self._last: int | None = None  # length of the last close-out planned
        self._pending: Future | None = None
        self._ready = False
        self._done = self.matcher.is_stopped()
        self._plan: list[int] | None = None  # the close-out planned by the last apply (within the window)
        self._schedule()

    # ------------------------------------------------------------------ the mask

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)  # drops the GIL

    def _schedule(self) -> None:
        self._ready = False
        if self.pool is not None:
            self._pending = self.pool.submit(self._compute)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        elif not self._ready:
            self._compute()
        self._ready = True

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar admits next."""
        self._wait()
        if self.matcher.is_error():
            err = self.matcher.get_error()
            raise ConstraintError(self._dead_end() if "NoExtension" in err else f"{self.c.name}: {_first(err)}")
        bits = np.unpackbits(self.bits.numpy().view(np.uint8), bitorder="little")[: self.vocab]
        return torch.from_numpy(bits.astype(bool))

    def apply(self, logits: torch.Tensor, left: int | None = None) -> torch.Tensor:
        """Set the logits (..., V) of every token the grammar does not admit next to -inf, in place; returns them.

        ``left``: tokens the sequence may still generate, this one included. Within :data:`CLOSE_WINDOW`
        of the end a close-out is planned at each step (:meth:`plan_close`); once it needs every token
        left, its tokens are forced (then EOS), and :meth:`vet` swaps a sampled token after which no
        close-out would fit for the plan's first one. So the output is complete within the budget
        whenever a completion of that length exists (a model free to the end would be cut mid-value).
        """
        ok = self.allowed()
        self._check(ok)
        self._plan = None
        near = self._last is None or left is None or left <= self._last + CLOSE_SLACK or left % 8 == 0  # else skip this step
        if self.close and left is not None and not self.forced and not self.closing and left <= CLOSE_WINDOW and near:
            plan = self._plan = self.plan_close(left - 1)  # one token kept for EOS
            self._last = None if plan is None else len(plan)
            if plan is not None and len(plan) + 1 >= left:
                self.forced, self.closing = self.lltok.decode_bytes(plan), True
        self._ok = ok
        if self.forced or self.closing:
            keep = torch.zeros_like(ok)
            keep[self._next_of(self.forced) if self.forced else self.eos] = True
            ok = ok & keep if bool((ok & keep).any()) else ok
        V = logits.shape[-1]
        with torch.inference_mode(logits.is_inference()):  # logits of an inference-mode forward may be updated in place there
            if V > len(ok):
                logits[..., len(ok):] = float("-inf")
            return logits.masked_fill_(~ok[:V], float("-inf"))

    def vet(self, token: int, left: int) -> int:
        """The token to take instead of the sampled ``token`` (``left`` as given to :meth:`apply`): ``token``
        itself unless the output could no longer be closed within the budget after it; then the first
        token of the close-out planned in :meth:`apply`."""
        if not self._plan or self.forced or self.closing:
            return token
        m = self.matcher
        if m.try_consume_tokens([int(token)]) != 1:
            return token
        fits = self.plan_close(left - 2) is not None  # after it: left - 1 tokens, one of them for EOS
        m.rollback(1)
        return token if fits else self._next_of(self.lltok.decode_bytes(self._plan))

    def _next_of(self, text: bytes) -> int:
        """The longest admitted token that starts ``text`` (the grammar engine admits only the canonical
        token where bytes are forced, e.g. ``ar`` rather than ``a`` inside a fixed key)."""
        for k in range(len(text), 0, -1):
            t = self.lltok.tokenize_bytes(text[:k])
            if len(t) == 1 and bool(self._ok[t[0]]):
                return t[0]
        return self.lltok.tokenize_bytes(text[:1])[0]

    def _check(self, ok: torch.Tensor) -> None:
        if not self.matcher.is_accepting() and int(ok.sum()) == int(ok[self.eos].sum()):  # only EOS (or nothing) left
            raise ConstraintError(self._dead_end())

    def check(self) -> None:
        """Raise :class:`ConstraintError` now if the grammar admits nothing from here (e.g. an empty language)."""
        self._check(self.allowed())

    def _dead_end(self) -> str:
        if self.tokens == 0:
            return f"{self.c.name} admits no output at all (an empty language: check its rules or bounds)"
        return f"{self.c.name} admits no continuation after {self.tokens} tokens (the grammar has a dead end)"

    # ------------------------------------------------------------------ tokens

    def accept(self, token: int) -> None:
        """Feed the sampled token; then start computing the next mask (on the pool, when there is one)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self.forced:
            piece = self.lltok.decode_bytes([int(token)])
            self.forced = self.forced[len(piece):] if self.forced.startswith(piece) else b""
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"{self.c.name}: token {token} is not allowed here ({_first(self.matcher.get_error())})")
        self.tokens += 1
        self._ready = False
        self._done = self.matcher.is_stopped()  # read before the worker borrows the matcher
        if not self._done:
            self._schedule()

    def plan_close(self, limit: int) -> list[int] | None:
        """The shortest-looking completion from here: single-character tokens that make the output a whole
        sentence of the language in at most ``limit`` tokens (depth-first, trying :data:`CLOSE_CHARS` in
        order: closing quotes and brackets first), or None. The parser state is left as it was."""
        m, path, nodes = self.matcher, [], 0

        def dfs(depth: int) -> bool:
            nonlocal nodes
            if m.is_accepting():
                return True
            if depth >= limit:
                return False
            for t in self._chars:
                nodes += 1
                if nodes > CLOSE_NODES:
                    return False
                if m.try_consume_tokens([t]) == 1:
                    path.append(t)
                    if dfs(depth + 1):
                        return True
                    path.pop()
                    m.rollback(1)
            return False

        found = dfs(0)
        if path:
            m.rollback(len(path))
        return path if found else None

    @property
    def done(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return self._done

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the language (it may go on, or end here)."""
        self._wait()
        return self.matcher.is_accepting()

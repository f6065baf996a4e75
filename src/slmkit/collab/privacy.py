"""Privacy shield: find personal data on the device, send placeholders, restore the reply.

Detectors (all local):

* e-mail addresses, phone numbers, payment-card numbers (13-19 digits that pass the
  Luhn checksum, ISO/IEC 7812-1 Annex B), IBANs (ISO 13616 mod-97 check), IPv4
  addresses and street addresses (house number + words + a street suffix) by pattern;
* person names by cue patterns ("Mr./Dr. ...", "my name is ...", "Dear ...",
  "Regards, ...", "From:", "cc:"), by a given-name gazetteer over capitalised word runs
  (:mod:`slmkit.collab.pii_names`) and, when a small model is given, by asking it to
  list the names in the text; a candidate is kept only if it occurs verbatim in the text
  and looks like a name (1-4 capitalised words), so a confused model cannot invent redactions.

Phone candidates that are dates (``2001-08-04``, ``12.03.2001``) are dropped, and a
two-group number without a ``+``/``(`` start (``2002-1025``) needs ten digits or a phone
cue word just before it (``call``, ``tel``, ``line``, ...). Card candidates must not be
glued to letters (the digits of an IBAN-shaped code are not a card).

Why not a PII library: Presidio (the well-kept choice) needs spaCy and a spaCy NER model,
which spaCy publishes on GitHub, not PyPI. ``bench/pii_eval.py`` measures the shield per kind
and Presidio beside it in the same run when it loads (measured with a PyPI upload of
en_core_web_sm; docs/benchmarks.md).

Each distinct value gets one placeholder (``[EMAIL_1]``, ``[NAME_2]``, ...), the remote
model sees only placeholders, and :func:`restore` puts the values back into its reply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from slmkit.backends.base import Backend, Completion, GenParams, Prompt
from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("email", "iban", "card", "phone", "ip", "address", "name")  #: also the priority when spans overlap

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,5}(?![\w])")
DATE_LIKE = re.compile(r"(?:19|20)\d\d[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])|(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:19|20)\d\d")
PHONE_CUE = re.compile(r"(?:\b(?:call|phone|tel|telephone|mobile|cell|fax|line|reach|dial|ring|text|number|no|ext)\b[.:]?\s*(?:(?:me|him|her|us|them|at|on|is|:)\s+){0,2})$", re.I)
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
STREET_SUFFIX = r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Square|Sq|Terrace|Close|Crescent)"
ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?(?:\s+[A-Z][a-z]+){{1,4}}\s+{STREET_SUFFIX}\b\.?(?:,?\s+(?:Apt|Suite|Unit|Flat)\.?\s*\w+)?"
    rf"(?:,\s*[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*)?(?:,?\s+[A-Z]{{2}})?(?:\s+\d{{5}}(?:-\d{{4}})?)?"
)
_NAME = r"[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?"
_FULLNAME = rf"{_NAME}(?:\s+{_NAME}){{0,3}}"
NAME_CUES = [
    re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Madam)\.?\s+(?P<name>{_FULLNAME})"),
    re.compile(rf"\b(?:[Mm]y name is|[Nn]ame:|I am|I'm|[Tt]his is|[Cc]all me|[Cc]ontact|[Ss]igned,?)\s+(?P<name>{_FULLNAME})"),
    re.compile(rf"\b(?:Dear|Hi|Hello|Good (?:morning|afternoon|evening)|Regards,|Thanks,|Sincerely,|Best,|Cheers,)\s+(?P<name>{_FULLNAME})"),
    re.compile(rf"(?m)^(?:From|To|Cc|cc|CC|Bcc|Attn|Attention):?[ \t]+(?P<name>{_FULLNAME})"),
    re.compile(rf"(?m)^--[ \t]*\n(?P<name>{_FULLNAME})"),
]
_NOT_NAMES = {"I", "The", "A", "An", "It", "We", "You", "He", "She", "They", "Please", "Thanks", "Hello", "Hi", "Dear",
              "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Sir", "Madam", "Team", "All"}


def luhn_ok(digits: str) -> bool:
    """Luhn checksum (ISO/IEC 7812-1): double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    num = "".join(str(int(ch, 36)) for ch in s[4:] + s[:4])
    return int(num) % 97 == 1


def phone_ok(s: str, before: str = "") -> bool:
    """A PHONE match that is a phone number: 7-15 digits, not a date, and either written
    internationally (``+``/``(`` first), in three or more groups, with ten or more digits, or
    right after a phone cue word (``before`` is the text just before the match)."""
    digits = re.sub(r"\D", "", s)
    if not 7 <= len(digits) <= 15 or not (s.startswith(("+", "(")) or re.search(r"[ .-]", s)):
        return False
    if DATE_LIKE.fullmatch(s):
        return False
    groups = len(re.findall(r"\d+", s))
    return s.startswith(("+", "(")) or groups >= 3 or len(digits) >= 10 or bool(PHONE_CUE.search(before))


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class ShieldConfig:
    kinds: tuple[str, ...] = KINDS  #: which kinds of personal data to redact
    model_names: bool = True  #: ask the small model for person names (when one is given)
    lexicon_names: bool = True  #: find person names with the given-name gazetteer (slmkit.collab.pii_names)
    max_new_tokens: int = 48  #: budget of the small model's name list

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"unknown PII kind(s) {bad}; known: {', '.join(KINDS)}")


def _looks_like_name(s: str) -> bool:
    words = s.split()
    return 1 <= len(words) <= 4 and all(re.fullmatch(_NAME, w) for w in words) and words[0] not in _NOT_NAMES


def model_names(small: Backend, text: str, max_new_tokens: int = 48) -> list[str]:
    """Person names the small model finds in ``text`` (only verbatim, name-shaped candidates)."""
    return model_names_batch(small, [text], max_new_tokens)[0]


def model_names_batch(small: Backend, texts: Sequence[str], max_new_tokens: int = 48) -> list[list[str]]:
    """:func:`model_names` for several texts in one call of the small model."""
    if not texts:
        return []
    tok = getattr(small, "tokenizer", None)
    chat = tok is None or getattr(tok, "chat_template", None)
    prompts: list[Prompt] = []
    for text in texts:
        ask = (
            "List every person's name that appears in the text below, one per line. "
            "If there is none, answer NONE.\n\nText: " + text
        )
        prompts.append([{"role": "user", "content": ask}] if chat else ask + "\nNames:")
    replies = small.generate(prompts, GenParams(max_new_tokens=max_new_tokens))
    found = []
    for text, c in zip(texts, replies):
        out: list[str] = []
        for line in c.text.splitlines():
            cand = re.sub(r"^[\s\-*\d.)]+", "", line).strip().strip(".,;:")
            if cand and cand in text and _looks_like_name(cand) and cand not in out:
                out.append(cand)
        found.append(out)
    return found


def _names_by_text(texts: Sequence[str], cfg: ShieldConfig, small: Backend | None) -> dict[str, list[str]] | None:
    """The small model's names for each distinct non-empty text, in one call (None when it is not asked)."""
    if small is None or not cfg.model_names or "name" not in cfg.kinds:
        return None
    distinct = list(dict.fromkeys(t for t in texts if t.strip()))
    return dict(zip(distinct, model_names_batch(small, distinct, cfg.max_new_tokens)))


def detect(text: str, cfg: ShieldConfig = ShieldConfig(), small: Backend | None = None,
           names: dict[str, list[str]] | None = None) -> list[Span]:
    """Non-overlapping spans of personal data in ``text`` (earlier, longer, higher-priority kinds win).

    ``names`` (from :func:`_names_by_text`) holds the small model's answers fetched beforehand in one batch.
    """
    found: list[Span] = []
    kinds = set(cfg.kinds)

    def add(kind, m_start, m_end):
        found.append(Span(kind, m_start, m_end, text[m_start:m_end]))

    if "email" in kinds:
        for m in EMAIL.finditer(text):
            add("email", *m.span())
    # digits inside an IBAN-shaped code (checksum right or not) are neither a card nor a phone
    iban_shaped = [m.span() for m in IBAN.finditer(text)]
    inside = lambda a, b: any(s <= a and b <= e for s, e in iban_shaped)  # noqa: E731
    if "card" in kinds:
        for m in CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_ok(digits) and not inside(*m.span()):
                add("card", *m.span())
    if "iban" in kinds:
        for m in IBAN.finditer(text):
            if iban_ok(m.group()):
                add("iban", *m.span())
    if "ip" in kinds:
        for m in IPV4.finditer(text):
            add("ip", *m.span())
    if "address" in kinds:
        for m in ADDRESS.finditer(text):
            add("address", *m.span())
    if "phone" in kinds:
        for m in PHONE.finditer(text):
            if phone_ok(m.group(), text[max(0, m.start() - 24) : m.start()]) and not inside(*m.span()):
                add("phone", *m.span())
    if "name" in kinds:
        found_names: list[str] = []
        for cue in NAME_CUES:
            for m in cue.finditer(text):
                cand = m.group("name")
                # trim trailing words that are not names (e.g. "Dr Smith Please")
                words = cand.split()
                while words and words[-1] in _NOT_NAMES:
                    words.pop()
                cand = " ".join(words)
                if cand and _looks_like_name(cand):
                    found_names.append(cand)
        if cfg.lexicon_names:
            from slmkit.collab.pii_names import lexicon_names

            found_names += lexicon_names(text)
        if names is None:
            names = _names_by_text([text], cfg, small)
        found_names += (names or {}).get(text, [])
        # every occurrence of each name, and of its parts (a surname alone, a first name alone)
        parts = {p for n in found_names for p in [n, *n.split()] if len(p) >= 3 and p not in _NOT_NAMES}
        for p in sorted(parts, key=len, reverse=True):
            for m in re.finditer(rf"\b{re.escape(p)}\b", text):
                add("name", *m.span())
    # resolve overlaps: priority by kind order, then length, then position
    prio = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda s: (prio[s.kind], -(s.end - s.start), s.start))
    taken: list[Span] = []
    for s in found:
        if all(s.end <= t.start or s.start >= t.end for t in taken):
            taken.append(s)
    return sorted(taken, key=lambda s: s.start)


@dataclass
class Redaction:
    """Placeholders and the values they stand for (kept on the device)."""

    mapping: dict[str, str] = field(default_factory=dict)  #: placeholder -> original value
    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, value)
        if key not in self._by_value:
            self._count[kind] = self._count.get(kind, 0) + 1
            ph = f"[{kind.upper()}_{self._count[kind]}]"
            self._by_value[key] = ph
            self.mapping[ph] = value
        return self._by_value[key]


def redact(text: str, cfg: ShieldConfig = ShieldConfig(), small: Backend | None = None, red: Redaction | None = None,
           names: dict[str, list[str]] | None = None) -> tuple[str, Redaction]:
    """``text`` with every detected span replaced by its placeholder."""
    red = red if red is not None else Redaction()
    out, pos = [], 0
    for s in detect(text, cfg, small, names):
        out += [text[pos : s.start], red.placeholder(s.kind, s.text)]
        pos = s.end
    out.append(text[pos:])
    return "".join(out), red


def _placeholder_pattern(red: Redaction) -> re.Pattern | None:
    """One regex for every placeholder, bracketed (``[EMAIL_1]``) or bare at word boundaries
    (``EMAIL_1``), longest first so ``NAME_12`` wins over ``NAME_1``."""
    if not red.mapping:
        return None
    names = sorted((ph[1:-1] for ph in red.mapping), key=len, reverse=True)
    alt = "|".join(map(re.escape, names))
    return re.compile(rf"\[(?:{alt})\]|\b(?:{alt})\b")


def restore(text: str, red: Redaction) -> str:
    """Put the original values back where the reply uses placeholders (also without brackets).

    One pass over the reply: word boundaries are those of the reply itself, so a restored
    value never joins or splits a neighbouring placeholder.
    """
    return _restore_from(text, 0, red, _placeholder_pattern(red))


def _restore_from(text: str, start: int, red: Redaction, pat: re.Pattern | None) -> str:
    """``text[start:]`` restored, judging word boundaries with the characters before ``start``."""
    if pat is None:
        return text[start:]
    out, pos = [], start
    for m in pat.finditer(text, start):  # with a start index, \b still sees text[start - 1]
        ph = m.group() if m.group().startswith("[") else f"[{m.group()}]"
        out += [text[pos : m.start()], red.mapping[ph]]
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


class StreamRestorer:
    """:func:`restore` for a reply that arrives in pieces.

    ``push(piece)`` returns the restored text that is safe to send now; a tail that may
    still grow into a placeholder (``[EMA``, ``[EMAIL_1``, or a trailing word that is a
    prefix of a bare ``EMAIL_1``) is held back until the next piece decides it, and
    ``close()`` returns what is left. The concatenated output equals ``restore(whole)``,
    however the reply is split, and never contains a placeholder of ``red``.
    """

    def __init__(self, red: Redaction):
        self.red = red
        self.names = [ph[1:-1] for ph in red.mapping]
        self.longest = max((len(ph) for ph in red.mapping), default=0)
        self.buf = ""
        self.prev = ""  #: last raw character already sent
        self.pat = _placeholder_pattern(red)

    def _held_from(self) -> int:
        """Start of the tail of ``buf`` that could still become (part of) a placeholder."""
        buf, cut = self.buf, len(self.buf)
        # a bracketed placeholder begun but not closed: "[" + a prefix of some "NAME_1]"
        for j in range(max(0, len(buf) - self.longest), len(buf)):
            tail = buf[j + 1 :]
            if buf[j] == "[" and any(len(tail) <= len(n) and f"{n}]".startswith(tail) for n in self.names):
                cut = j
                break
        # a bare placeholder needs a word boundary after it: a trailing word that is a prefix of one waits
        m = re.search(r"\w+$", buf)
        if m and any(n.startswith(m.group()) for n in self.names):
            cut = min(cut, m.start())
        return cut

    def push(self, piece: str) -> str:
        self.buf += piece
        return self._emit(self._held_from() if self.names else len(self.buf))

    def close(self) -> str:
        return self._emit(len(self.buf))

    def _emit(self, cut: int) -> str:
        out, self.buf = self.buf[:cut], self.buf[cut:]
        if not out:
            return ""
        # the previous raw character goes in front, so a word boundary (or its absence) at the seam
        # is judged as in the whole reply; matches are only searched from the new text on
        restored = _restore_from(self.prev + out, len(self.prev), self.red, self.pat)
        self.prev = out[-1]
        return restored


def _texts(prompt: Prompt) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]


def redact_prompt(prompt: Prompt, cfg: ShieldConfig, small: Backend | None, red: Redaction,
                  names: dict[str, list[str]] | None = None) -> Prompt:
    if names is None:
        names = _names_by_text(_texts(prompt), cfg, small)
    if isinstance(prompt, str):
        return redact(prompt, cfg, small, red, names)[0]
    return [{**m, "content": redact(str(m.get("content", "")), cfg, small, red, names)[0]} for m in prompt]


def _kinds(red: Redaction) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for ph in red.mapping:
        k = ph[1:].rsplit("_", 1)[0].lower()
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def shielded_generate(
    remote: Backend, prompts: Sequence[Prompt], params: GenParams, cfg: ShieldConfig = ShieldConfig(), small: Backend | None = None
) -> list[Completion]:
    """Generate with ``remote`` while only placeholders leave the device; replies are restored.

    Every prompt is redacted (each with its own placeholders), then all go to ``remote``
    in one call. Each completion's ``meta`` gets ``redacted`` (count per kind) and ``placeholders``.
    """
    reds = [Redaction() for _ in prompts]
    names = _names_by_text([t for p in prompts for t in _texts(p)], cfg, small)  # one small-model call for all
    safe = [redact_prompt(p, cfg, small, red, names) for p, red in zip(prompts, reds)]
    out = []
    for c, red in zip(remote.generate(safe, params) if safe else [], reds):
        out.append(Completion(restore(c.text, red), c.tokens, c.finish_reason, c.logprobs,
                              {**c.meta, "redacted": _kinds(red), "placeholders": len(red.mapping)}))
    return out


class ShieldedBackend:
    """A :class:`~slmkit.backends.base.Backend` that redacts prompts before calling ``remote``."""

    def __init__(self, remote: Backend, small: Backend | None = None, cfg: ShieldConfig = ShieldConfig()):
        self.remote, self.small, self.cfg = remote, small, cfg
        self.name = f"shield({remote.name})"

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]:
        return shielded_generate(self.remote, prompts, params, self.cfg, self.small)

    def stream(self, prompt: Prompt, params: GenParams, on_text) -> Completion:
        """Stream the remote reply with placeholders restored (see :class:`StreamRestorer`)."""
        from slmkit.backends.stream import generate_streaming

        red = Redaction()
        safe = redact_prompt(prompt, self.cfg, self.small, red)
        restorer = StreamRestorer(red)

        def relay(piece: str):
            out = restorer.push(piece)
            return on_text(out) if out else None

        c = generate_streaming(self.remote, safe, params, relay)
        rest = restorer.close()
        if rest:
            on_text(rest)
        return Completion(restore(c.text, red), c.tokens, c.finish_reason, c.logprobs,
                          {**c.meta, "redacted": _kinds(red), "placeholders": len(red.mapping)})

    def score(self, texts, contexts=None):
        red = Redaction()
        names = _names_by_text([*texts, *(contexts or [])], self.cfg, self.small)
        safe_texts = [redact(t, self.cfg, self.small, red, names)[0] for t in texts]
        safe_ctx = None if contexts is None else [redact(c, self.cfg, self.small, red, names)[0] for c in contexts]
        return self.remote.score(safe_texts, safe_ctx)

"""Streaming text out of a backend: incremental detokenisation with stop strings.

A backend that can stream has a method
``stream(prompt, params, on_text) -> Completion``: it calls ``on_text(piece)`` with
each new piece of the completion's text as it is generated and returns the whole
:class:`~slmkit.backends.base.Completion` at the end. The pieces concatenate to the
completion's ``text``. When ``on_text`` returns True (e.g. the client went away), the
backend stops generating as soon as it can. :func:`generate_streaming` calls that
method, or falls back to ``generate`` and one piece for backends that cannot stream.

:func:`releasable` is the rule every streamer here (and the runtime engine) uses to
decide how much of the decoded text may go out: never text at or past a stop string,
never the tail that could still become one, never an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from slmkit.backends.base import Backend, Completion, GenParams, Prompt

#: ``on_text(piece) -> stop?``: receives each new piece of text; True asks the backend to stop.
OnText = Callable[[str], "bool | None"]


def stop_index(text: str, stops: Iterable[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def releasable(text: str, sent: int, stops: Iterable[str], final: bool) -> tuple[str, int, bool]:
    """``(text, end, hit)``: ``text`` cut at its first stop string (``hit``), and the index
    up to which it may be emitted, given that ``sent`` characters already were.

    Unless ``final`` (or a stop was hit), the last ``len(longest stop) - 1`` characters
    are held back (they may begin a stop string) and so is a trailing U+FFFD (a
    multi-byte character whose remaining tokens have not been generated yet).
    """
    stops = [s for s in stops if s]
    cut = stop_index(text, stops)
    if cut >= 0:
        text, final = text[:cut], True
    end = len(text)
    if not final:
        hold = max((len(s) for s in stops), default=1) - 1
        end = max(sent, len(text) - hold)
        while end > sent and text[end - 1] == "\ufffd":
            end -= 1
    return text, max(end, sent), cut >= 0


class TokenText:
    """Turns a growing list of token ids into text pieces for ``on_text``.

    ``push(ids)`` adds generated ids (ids from the first EOS on are ignored, as they
    are in the final text); it returns True once a stop string was hit or ``on_text``
    asked to stop, i.e. when generation should end. ``close()`` sends the rest.
    """

    def __init__(self, tokenizer, stops: Iterable[str], on_text: OnText | None, eos: Iterable[int] = ()):
        self.tok, self.stops, self.on_text, self.eos = tokenizer, tuple(s for s in stops if s), on_text, set(eos)
        self.ids: list[int] = []
        self.sent = 0
        self.ended = False  #: an EOS was seen
        self.hit_stop = False
        self.cancelled = False  #: on_text returned True

    @property
    def done(self) -> bool:
        return self.ended or self.hit_stop or self.cancelled

    def push(self, ids: Iterable[int]) -> bool:
        if self.done:
            return True
        for t in ids:
            t = int(t)
            if t in self.eos:
                self.ended = True
                break
            self.ids.append(t)
        self._flush(final=self.ended)
        return self.done

    def close(self) -> None:
        if not (self.hit_stop or self.cancelled):
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        text, end, hit = releasable(text, self.sent, self.stops, final)
        self.hit_stop = self.hit_stop or hit
        if end > self.sent:
            piece, self.sent = text[self.sent : end], end
            if self.on_text is not None and self.on_text(piece):
                self.cancelled = True


def generate_streaming(backend: Backend, prompt: Prompt, params: GenParams, on_text: OnText) -> Completion:
    """Generate one completion, passing its text to ``on_text`` piece by piece.

    Backends with a ``stream`` method stream as they generate; any other backend
    generates the whole completion first and hands it over as one piece.
    """
    stream = getattr(backend, "stream", None)
    if callable(stream):
        return stream(prompt, params, on_text)
    c = backend.generate([prompt], params)[0]
    if c.text:
        on_text(c.text)
    return c

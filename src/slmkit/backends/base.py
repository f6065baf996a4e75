"""The backend Protocol: where text comes from.

Evaluation, trust and collaboration code talks only to this Protocol, so the
same code runs against a local Hugging Face model or any OpenAI-compatible
endpoint (vLLM, llama.cpp's server, a cloud API, ``slmkit serve``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

from slmkit.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from slmkit.runtime.constrain import Constraint

#: A prompt is raw text (continued as is) or a chat (a list of {"role", "content"} messages).
Prompt = Union[str, list[dict]]


@dataclass(frozen=True)
class GenParams:
    """Sampling settings shared by every backend."""

    max_new_tokens: int = 128  #: tokens to generate at most
    temperature: float = 0.0  #: 0 means greedy
    top_p: float = 1.0  #: nucleus sampling mass, in (0, 1]
    seed: int | None = None  #: makes sampling reproducible
    stop: tuple[str, ...] = ()  #: generation ends before the first of these strings
    logprobs: bool = False  #: return the log-probability of each generated token
    seeds: tuple[int, ...] | None = None  #: one seed per prompt of a call (overrides ``seed + i``)
    constraint: Constraint | None = None  #: output must match this JSON schema / regex / grammar (slmkit.runtime.constrain)

    def seed_for(self, i: int) -> int | None:
        """The sampling seed of prompt ``i`` of a call: ``seeds[i]`` when given, else ``seed + i`` (None: unseeded)."""
        if self.seeds is not None:
            if i >= len(self.seeds):
                raise ConfigError(f"GenParams.seeds has {len(self.seeds)} seeds, but prompt {i} of the call needs one")
            return self.seeds[i]
        return None if self.seed is None else self.seed + i

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))


@dataclass
class Completion:
    text: str  #: the generated text only (prompt excluded, stop string excluded)
    tokens: int  #: number of generated tokens
    finish_reason: str  #: "stop" (EOS or stop string) or "length"
    logprobs: list[float] | None = None  #: per generated token, when asked for
    meta: dict = field(default_factory=dict)  #: backend-specific extras (e.g. escalated=True)


@dataclass
class TokenScores:
    """Log-probabilities of the tokens of a text (or of a continuation given a context)."""

    tokens: list[str]
    logprobs: list[float]
    greedy: list[bool] | None = None  #: whether each token was the argmax (lm-eval's is_greedy)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


class PartialFailure(BackendError):
    """Some prompts of a call failed (after their retries); the others may have got answers.

    ``results[i]`` is prompt ``i``'s answer (a :class:`Completion` or :class:`TokenScores`), or None
    for each failed ``i``; ``failed`` maps those indices to what went wrong. Callers that can use
    partial results (``gen-data`` writes the answered rows and leaves the rest to a rerun) catch it.
    """

    def __init__(self, results: list, errors: dict[int, BackendError]):
        self.results = results
        self.failed = {i: errors[i].problem for i in sorted(errors)}
        first = min(errors)
        if len(errors) == len(results):  # nothing came back: the first error says it all
            problem = errors[first].problem if len(results) == 1 else f"all {len(results)} requests failed (prompt {first}: {errors[first].problem})"
            super().__init__(problem, errors[first].hint)
        else:
            super().__init__(f"{len(errors)} of {len(results)} requests failed (prompt {first}: {errors[first].problem})",
                             "the other answers came back; check the server, then rerun")


@runtime_checkable
class Backend(Protocol):
    """Anything that generates and scores text."""

    name: str

    def generate(self, prompts: Sequence[Prompt], params: GenParams) -> list[Completion]: ...

    def score(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
        """Token log-probs of each text; with ``contexts``, of each text as a continuation of its context."""
        ...

"""lm-evaluation-harness adapter: slmkit models and backends as the lm-eval model ``slmkit``.

lm-eval (Gao et al., "A framework for few-shot language model evaluation", EleutherAI) poses every
task as three kinds of request; :class:`SlmkitLM` answers them on a slmkit backend:

* ``loglikelihood`` (context, continuation): lm-eval's own :class:`~lm_eval.api.model.TemplateLM`
  splits the pair into tokens (trailing context whitespace moved onto the continuation, an empty
  context replaced by the prefix token), and :meth:`SlmkitLM._loglikelihood_tokens` scores them
  as ``HFLM._loglikelihood_tokens`` does (left-truncated to ``max_length + 1`` tokens).
* ``loglikelihood_rolling`` (text): ``lm_eval.utils.get_rolling_token_windows`` and
  ``make_disjoint_window`` cut the text into windows of ``max_length`` tokens, each scored
  like a loglikelihood pair (``HFLM.loglikelihood_rolling``).
* ``generate_until`` (context, gen_kwargs): greedy or sampled generation through the backend,
  stopping at ``until`` (and EOS), at most ``max_gen_toks`` (default 256) new tokens.

Backends: any spec :func:`slmkit.models.load` takes (``default``, a Hugging Face directory or hub id,
a packed quantised directory, a GGUF file, dequantised) through :class:`~slmkit.backends.HFBackend`;
``fast=true`` generates on the fast path (:class:`~slmkit.runtime.backend.FastBackend`, a quantised
GGUF or packed directory running its own codes) and scores its dequantised weights; an
``http(s)://`` endpoint through :class:`~slmkit.backends.OpenAIBackend` (text in, text out: the
endpoint tokenises; loglikelihood needs ``echo`` + ``logprobs`` as vLLM serves them, and rolling
log-likelihood scores each text whole, without windows).

lm-eval finds the class by its registered name ``slmkit``: on import of this module (``slmkit lm-eval``
and ``python -m slmkit.eval.lmeval ...``, which runs lm-eval's own command line), and through the
``lm_eval.models`` entry point in pyproject.toml for lm-eval releases that discover plugins.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import lm_eval
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import has_bos_prefix, handle_stop_sequences, normalize_gen_kwargs, resolve_max_length

from slmkit.backends.base import GenParams
from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  #: lm-eval's default for generate_until (HFLM.max_gen_toks)


def _flag(value, name: str) -> bool:
    """A model_args boolean (lm-eval passes strings like ``True``/``false`` or real booleans)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise ConfigError(f"--model_args {name}={value!r}: expected true or false")


def _positive(value, name: str, default: int) -> int:
    if value is None or value == "auto" or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--model_args {name}={value!r}: expected a positive integer") from None
    if n < 1:
        raise ConfigError(f"--model_args {name}={value!r}: expected a positive integer")
    return n


@register_model("slmkit")
class SlmkitLM(TemplateLM):
    """lm-eval's ``--model slmkit --model_args model=SPEC[,dtype=fp32|bf16][,fast=true][,weights=native|int8|int4]
    [,max_length=N][,api_key=K]``."""

    def __init__(self, model: str = "default", dtype: str | None = None, fast=False, weights: str = "native",
                 max_length=None, batch_size=8, max_batch_size=None, device=None, api_key: str | None = None,
                 backend=None, **unused):
        super().__init__()
        if unused:
            raise ConfigError(f"--model_args: unknown argument(s) {', '.join(sorted(unused))} for the slmkit model",
                              "known: model, dtype, fast, weights, max_length, batch_size, api_key")
        if device not in (None, "", "cpu"):
            log.warning("slmkit lm-eval model: device=%s ignored (slmkit loads on the CPU)", device)
        self.spec = str(model)
        bs = _positive(batch_size, "batch_size", 8)
        if backend is None:
            backend = self._backend(self.spec, dtype, _flag(fast, "fast"), weights, api_key)
        self.backend = backend
        self.tokenizer = getattr(backend, "tokenizer", None)
        self.scorer = None  # the local model's token scorer (None: an endpoint, scored by text)
        if self.tokenizer is not None:
            from slmkit.backends.hf import HFBackend

            self.scorer = backend if isinstance(backend, HFBackend) else HFBackend(backend.model, self.tokenizer, name=self.spec)
            self.scorer.batch_size = bs
            if hasattr(backend, "batch_size"):
                backend.batch_size = bs
        self._max_length = None if max_length is None else _positive(max_length, "max_length", 0)

    @staticmethod
    def _backend(spec: str, dtype: str | None, fast: bool, weights: str, api_key: str | None):
        from slmkit.backends import from_spec, is_endpoint

        if is_endpoint(spec):
            return from_spec(spec, api_key=api_key)
        if fast:
            from slmkit.runtime.backend import FastBackend

            return FastBackend.from_spec(spec, dtype, weights)
        from slmkit.backends import HFBackend

        return HFBackend.from_spec(spec, dtype=dtype or "fp32")

    # ---------------------------------------------------------------- tokens (local models)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS: what leads an empty context (HFLM.prefix_token_id)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        """Tokens per forward pass: ``max_length`` of model_args, else the model's context (HFLM's rule)."""
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.scorer.model.config, self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids; its own special tokens unless told otherwise, none when ``string`` already
        starts with the prefix token (HFLM.tok_encode without add_bos_token)."""
        tok = self.tokenizer
        if add_special_tokens is None and has_bos_prefix(string, tok.decode(self.prefix_token_id)):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return tok.encode(string, **kw)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probs, whether every token was the argmax) of each continuation after its context."""
        seqs = []
        for _, ctx, cont in requests:
            ids = (list(ctx) + list(cont))[-(self.max_length + 1):]  # HFLM: keep the last max_length+1 tokens
            seqs.append((ids, len(ids) - len(cont)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # like lengths share a batch: less padding
        scores = dict(zip(order, self.scorer.score_ids([seqs[i] for i in order])))
        out = []
        for i in range(len(seqs)):
            res = (scores[i].total, bool(all(scores[i].greedy or ())))
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", None, res)
        return out

    # ---------------------------------------------------------------- requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.scorer is not None:
            return super().loglikelihood(requests, disable_tqdm)
        pairs = [req.args for req in requests]
        scores = self.backend.score([c for _, c in pairs], [x for x, _ in pairs])
        return [(s.total, bool(s.greedy is not None and all(s.greedy))) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        if self.scorer is None:
            return [s.total for s in self.backend.score(texts)]
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
                ctx, cont = lm_utils.make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions of each context, requests with equal gen_kwargs generated together (in order)."""
        eos = self.tokenizer.decode(self.eot_token_id) if self.tokenizer is not None else None
        out: list[str] = []
        for _, group in groupby(enumerate(requests), key=lambda r: repr(sorted(r[1].args[1].items()))):
            group = list(group)
            params = self._gen_params(dict(group[0][1].args[1]), eos)
            contexts = [self._truncate(req.args[0], params.max_new_tokens) for _, req in group]
            for (_, req), c in zip(group, self.backend.generate(contexts, params)):
                out.append(c.text)
                self.cache_hook.add_partial("generate_until", req.args, c.text)
        return out

    def _gen_params(self, gen_kwargs: dict, eos: str | None) -> GenParams:
        kw = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
        return GenParams(max_new_tokens=int(kw["max_gen_toks"]), temperature=temperature,
                         top_p=float(kw.get("top_p") or 1.0), seed=gen_kwargs.get("seed"), stop=tuple(until))

    def _truncate(self, context: str, max_new: int) -> str:
        """Keep the last ``max_length - max_new`` tokens of a local model's context (HFLM's left truncation)."""
        if self.tokenizer is None:
            return context
        keep = self.max_length - max_new
        if keep < 1:
            raise ConfigError(f"max_gen_toks {max_new} leaves no room for the context in max_length {self.max_length}")
        ids = self.tok_encode(context)
        return context if len(ids) <= keep else self.tokenizer.decode(ids[-keep:])

    def get_model_info(self) -> dict:
        return {"model_spec": self.spec, "backend": type(self.backend).__name__}


#: slmkit's local task files (data from the shared data directory, no download)
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


@dataclass(frozen=True)
class LMEvalConfig:
    """What ``slmkit lm-eval`` runs."""

    tasks: tuple[str, ...]  #: lm-eval task (or group) names: built-in, slmkit's local ones, or under include_path
    include_path: tuple[str, ...] = ()  #: extra folders of task YAMLs (slmkit's TASKS_DIR is always included)
    limit: int = 0  #: the first N documents of each task (0: all)
    num_fewshot: int | None = None  #: few-shot examples (None: each task's own setting)
    seed: int = 1234  #: lm-eval's random, numpy, torch and few-shot seeds

    def __post_init__(self):
        if not self.tasks:
            raise ConfigError("--tasks: give at least one task name")
        if self.limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        for d in self.include_path:
            if not Path(d).is_dir():
                raise ConfigError(f"--include-path {d}: not a directory of task YAML files")


def evaluate(lm: SlmkitLM, cfg: LMEvalConfig) -> dict:
    """Run ``cfg.tasks`` on ``lm`` with lm-eval's ``simple_evaluate``; ``{task: {metric: value}}`` plus what ran.

    Metric names are lm-eval's with the ``,none`` filter suffix dropped (other filters keep theirs).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *cfg.include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)  # ~0.1 s; indexing lm-eval's own ~15k: ~17 s
    if not set(cfg.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    for name in cfg.tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            raise ConfigError(f"--tasks: unknown lm-eval task {name!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""),
                              f"slmkit's local tasks: {', '.join(local_tasks())}; or --include-path DIR with your task YAMLs")
    res = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit or None,
                          num_fewshot=cfg.num_fewshot, log_samples=False, bootstrap_iters=0, random_seed=cfg.seed,
                          numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    tasks = {}
    for task, metrics in res["results"].items():
        tasks[task] = {k.removesuffix(",none"): v for k, v in metrics.items() if k != "alias" and not k.endswith("_stderr,none")}
    return {"model": lm.spec, "tasks": tasks, "n_samples": {t: v.get("effective") for t, v in res.get("n-samples", {}).items()},
            "limit": cfg.limit, "lm_eval_version": lm_eval.__version__}


def local_tasks() -> list[str]:
    """The task names of slmkit's local task files."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line with the ``slmkit`` model registered (``python -m slmkit.eval.lmeval``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

"""Preference optimisation on ``{"prompt", "chosen", "rejected"}`` pairs, through TRL.

* ``dpo``: Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), TRL's ``DPOTrainer``.
  With LoRA the reference policy is the base model with the adapters switched off; with full
  fine-tuning it is a frozen copy of the starting model.
* ``simpo``: SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: the reward is the
  length-normalised log-likelihood ``beta / |y| * log pi(y|x)`` with a target margin ``gamma``
  (TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``).

:func:`preference_metrics` measures a model on held-out pairs: implicit-reward accuracy and
margin (DPO's reward needs a reference; SimPO's does not) and the plain log-likelihood
preference (does the model give the chosen answer more probability than the rejected one?).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError
from slmkit.registry import Registry
from slmkit.train.sft import LoraSettings, require_chat_template, run_identity, run_trainer, trainable_marker, trainer_args

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PreferenceMethod:
    """A registered preference method: its TRL trainer, its implicit reward and its defaults."""

    trainer: Callable  #: (model, tokenizer, pairs, cfg, checkpoint dir, callbacks) -> a transformers Trainer
    reward: Callable[[float, int, float, float], float]  #: (log pi(y|x), |y|, log pi_ref(y|x), beta) -> reward
    default_beta: float  #: beta when the config leaves it out
    uses_reference: bool = True  #: False: reference-free (the reward ignores log pi_ref)
    margin_field: str | None = None  #: the config field holding the target margin gamma (None: 0)


PREFERENCE_METHODS: Registry[PreferenceMethod] = Registry("preference method")


def preference_method(name: str, *, reward, default_beta: float, uses_reference: bool = True,
                      margin_field: str | None = None):
    """Register the decorated trainer builder as preference method ``name``."""
    def deco(fn):
        PREFERENCE_METHODS.add(name, PreferenceMethod(fn, reward, default_beta, uses_reference, margin_field))
        return fn

    return deco


@dataclass(frozen=True)
class PreferenceConfig:
    """Knobs of :func:`preference_train`."""

    method: str = "dpo"  #: a name in PREFERENCE_METHODS: dpo, simpo
    beta: float | None = None  #: DPO: KL strength (default 0.1); SimPO: reward scale (default 2.0)
    simpo_gamma: float = 0.5  #: SimPO target margin (in units of beta-scaled reward)
    lora: LoraSettings | None = field(default_factory=LoraSettings)  #: None = full fine-tuning
    max_steps: int = 50
    learning_rate: float | None = None  #: default 5e-5 with LoRA, 1e-6 for full fine-tuning
    batch_size: int = 2  #: pairs per step
    grad_accum: int = 1
    max_length: int = 512  #: prompt + answer tokens (longer pairs are truncated)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 50
    logging_steps: int = 10
    seed: int = 0

    def __post_init__(self):
        PREFERENCE_METHODS.get(self.method)
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-5 if self.lora is not None else 1e-6

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else PREFERENCE_METHODS.get(self.method).default_beta


@dataclass
class PreferenceResult:
    model: object
    steps: int
    train_loss: float
    log_history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- data

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_turns(text: str) -> list[dict]:
    """An hh-rlhf dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) as chat messages."""
    parts = _TURN.split(text)
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def split_hh(chosen: str, rejected: str) -> dict | None:
    """One hh-rlhf pair as ``{"prompt": messages, "chosen": [msg], "rejected": [msg]}``.

    The two dialogues share every turn but the final assistant one; pairs that
    do not (or whose final answers are equal or empty) give None.
    """
    c, r = hh_turns(chosen), hh_turns(rejected)
    if len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        return None
    if not c[-1]["content"] or not r[-1]["content"] or c[-1] == r[-1]:
        return None
    return {"prompt": c[:-1], "chosen": [c[-1]], "rejected": [r[-1]]}


def read_hh(path: str | Path, limit: int = 0) -> list[dict]:
    """Preference pairs from an hh-rlhf jsonl(.gz) file (fields ``chosen``, ``rejected``), in file order."""
    from slmkit.errors import DataError
    from slmkit.train.records import iter_rows

    out = []
    for lineno, row in iter_rows(path):
        for key in ("chosen", "rejected"):
            if key not in row:
                raise DataError(f"{path}:{lineno}: missing field '{key}'")
        pair = split_hh(row["chosen"], row["rejected"])
        if pair is not None:
            out.append(pair)
            if limit and len(out) >= limit:
                break
    return out


# ---------------------------------------------------------------------------- metrics


@torch.inference_mode()
def answer_logps(model, tokenizer, prompt: list[dict], answers: list[list[dict]], max_length: int = 512) -> list[tuple[float, int]]:
    """``(sum of log-probs, token count)`` of each answer (the final assistant turn) after ``prompt``."""
    from slmkit.train.sft import assistant_spans

    out = []
    for ans in answers:
        text, spans = assistant_spans(tokenizer, prompt + ans)
        start = spans[-1][0]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        first = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= start)
        ids = ids[:max_length]
        if first >= len(ids) or first == 0:
            out.append((0.0, 0))
            continue
        x = torch.tensor([ids], device=next(model.parameters()).device)
        logp = F.log_softmax(model(input_ids=x).logits[0].float(), -1)  # (T, V)
        tgt = x[0, first:]
        lp = logp[first - 1 : len(ids) - 1].gather(-1, tgt[:, None])[:, 0]
        out.append((float(lp.sum()), len(tgt)))
    return out


def pair_logps(model, tokenizer, pairs: list[dict], max_length: int = 512) -> list[tuple[float, int, float, int]]:
    """``(log p(chosen), |chosen|, log p(rejected), |rejected|)`` per pair, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for p in pairs:
        (lc, nc), (lr, nr) = answer_logps(model, tokenizer, p["prompt"], [p["chosen"], p["rejected"]], max_length)
        out.append((lc, nc, lr, nr))
    model.train(was_training)
    return out


def preference_metrics(model, tokenizer, pairs: list[dict], cfg: PreferenceConfig, reference=None, policy_logps=None) -> dict:
    """Reward accuracy and margin of ``model`` on ``pairs``.

    DPO's implicit reward is ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al., Eq. 5);
    ``reference`` is a model, ``"adapters-off"`` (a PEFT model with its adapters disabled), the
    :func:`pair_logps` of the reference on these pairs, or None (then the reward is 0, which is
    what it is before any training). SimPO's reward is ``beta / |y| * log pi(y|x)`` (Meng et al.,
    Eq. 4). ``logp_accuracy`` is the share of pairs where the chosen answer has the higher
    log-likelihood; ties count as wrong. ``policy_logps`` reuses :func:`pair_logps` of ``model``.
    """
    beta = cfg.effective_beta
    method = PREFERENCE_METHODS.get(cfg.method)
    policy = policy_logps if policy_logps is not None else pair_logps(model, tokenizer, pairs, cfg.max_length)
    if not method.uses_reference or reference is None:
        ref = None
    elif isinstance(reference, list):
        ref = reference
    elif reference == "adapters-off":
        with model.disable_adapter():
            ref = pair_logps(model, tokenizer, pairs, cfg.max_length)
    else:
        ref = pair_logps(reference, tokenizer, pairs, cfg.max_length)
    margins = []
    for i, (lc, nc, lr, nr) in enumerate(policy):
        if method.uses_reference and ref is None:
            rc = rr = 0.0
        else:
            rc = method.reward(lc, nc, ref[i][0] if ref else 0.0, beta)
            rr = method.reward(lr, nr, ref[i][2] if ref else 0.0, beta)
        margins.append(rc - rr)
    n = max(len(policy), 1)
    gamma = getattr(cfg, method.margin_field) if method.margin_field else 0.0
    return {
        "pairs": len(policy),
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "logp_accuracy": sum(lc > lr for lc, _, lr, _ in policy) / n,
        "logp_margin": sum(lc - lr for lc, _, lr, _ in policy) / n,
        "logp_per_token_accuracy": sum(lc / max(nc, 1) > lr / max(nr, 1) for lc, nc, lr, nr in policy) / n,
        f"{cfg.method}_loss": sum(-F.logsigmoid(torch.tensor(m - gamma)).item() for m in margins) / n,
    }


# ---------------------------------------------------------------------------- training


def _dataset(pairs: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])


def dpo_reward(logp: float, tokens: int, ref_logp: float, beta: float) -> float:
    """beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5)."""
    return beta * (logp - ref_logp)


def simpo_reward(logp: float, tokens: int, ref_logp: float, beta: float) -> float:
    """beta / |y| * log pi(y|x), reference-free (Meng et al. 2024, Eq. 4)."""
    return beta * logp / max(tokens, 1)


@preference_method("dpo", reward=dpo_reward, default_beta=0.1)
def _dpo_trainer(model, tokenizer, pairs, cfg: PreferenceConfig, ckpt: Path, callbacks):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trainer_args(cfg, ckpt, model), beta=cfg.effective_beta, loss_type=["sigmoid"], max_length=cfg.max_length)
    ref = None if cfg.lora is not None else copy.deepcopy(model).eval()
    return DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=_dataset(pairs),
        processing_class=tokenizer,
        peft_config=cfg.lora.peft_config() if cfg.lora is not None else None,
        callbacks=callbacks,
    )


@preference_method("simpo", reward=simpo_reward, default_beta=2.0, uses_reference=False, margin_field="simpo_gamma")
def _simpo_trainer(model, tokenizer, pairs, cfg: PreferenceConfig, ckpt: Path, callbacks):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        **trainer_args(cfg, ckpt, model),
        beta=cfg.effective_beta,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=cfg.simpo_gamma,
        max_length=cfg.max_length,
    )
    return CPOTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(pairs),
        processing_class=tokenizer,
        peft_config=cfg.lora.peft_config() if cfg.lora is not None else None,
        callbacks=callbacks,
    )


def preference_train(
    model,
    tokenizer,
    pairs: list[dict],
    cfg: PreferenceConfig,
    checkpoints: str | Path,
    resume: bool = False,
    callbacks: list | None = None,
) -> PreferenceResult:
    """Train ``model`` on preference ``pairs`` with ``cfg.method``; checkpoints and resume as in SFT."""
    require_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ckpt = Path(checkpoints)
    identity = run_identity(cfg.method, model, pairs, cfg)
    model.train()
    trainable_marker(model)
    use_cache = model.config.use_cache
    trainer = PREFERENCE_METHODS.get(cfg.method).trainer(model, tokenizer, pairs, cfg, ckpt, callbacks)
    return PreferenceResult(*run_trainer(trainer, model, ckpt, resume, use_cache, identity))

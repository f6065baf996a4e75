"""The prompt-inversion run behind ``slmkit invert``: collect pairs, train an inverter, measure the leak, save.

:func:`run_inversion` is the one library call the CLI verb makes (flags -> :class:`InvertRun` ->
this call -> print). It reads the pair files (:func:`slmkit.collab.inversion.read_pairs`), with a
``target`` queries it for the outputs, then either evaluates an existing inverter (``adapter``, or
the bare model) or trains one with :func:`slmkit.collab.inversion.train_inverter` and evaluates it
against the untrained model, writing the result as an slmkit artefact. The model is seen only
through the :class:`~slmkit.backends.Backend` protocol.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.artefact import Manifest, atomic_file
from slmkit.backends import GenParams, from_model, from_spec
from slmkit.collab.inversion import InvertConfig, Pair, collect_pairs, evaluate, read_pairs, train_inverter
from slmkit.errors import ConfigError
from slmkit.train.sft import SFTConfig, check_training_output, checkpoint_dir, finish_checkpoints, save_trained


@dataclass(frozen=True)
class InvertRun:
    """One inversion request: data, what to train or evaluate, and where to write."""

    model: str  #: the inverter's model (with ``train``: the base to fine-tune)
    train: Path | None = None  #: pairs to train on
    output: Path | None = None  #: with ``train``: directory to write (adapter, or model with ``merge``/``full``)
    eval_data: Path | None = None  #: held-out pairs to score the reconstructions on
    adapter: Path | None = None  #: with ``eval_data``: an inverter adapter loaded onto ``model``
    zero_shot: bool = True  #: also score the untrained model asked zero-shot
    target: str | None = None  #: a model or endpoint queried with the data's prompts for their outputs
    system_query: str | None = None  #: with ``target``: each prompt sent as the system prompt, this as the user turn
    save_pairs: Path | None = None  #: with ``target``: write the collected pairs here (jsonl)
    target_tokens: int = 128  #: with ``target``: longest collected output (tokens)
    role: str = "user"  #: in messages rows, the hidden prompt is the last message of this role
    full: bool = False  #: full fine-tuning (else LoRA, as ``sft.lora`` says)
    merge: bool = False  #: fold LoRA adapters into the weights and write a model
    limit: int = 0  #: first N rows of each data file (0 = all)
    dtype: str = "fp32"
    force: bool = False  #: replace an output directory slmkit did not write
    invert: InvertConfig = field(default_factory=InvertConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self):
        if self.train is None and self.eval_data is None:
            raise ConfigError("give --train DATA --output DIR, --eval DATA, or both")
        if self.train is not None and self.output is None:
            raise ConfigError("--train needs --output DIR (where the inverter is written)")
        if self.adapter is not None and self.train is not None:
            raise ConfigError("--adapter evaluates an existing inverter; it cannot be combined with --train")
        if self.merge and self.full:
            raise ConfigError("--merge folds LoRA adapters; --full already writes a model")
        if (self.system_query is not None or self.save_pairs is not None) and self.target is None:
            raise ConfigError("--system-query and --save-pairs need --target")


def _pairs(req: InvertRun) -> dict[str, list[Pair]]:
    """The pairs of each given file (``train``, ``eval``), their outputs collected from ``target`` if given."""
    files = {"train": req.train, "eval": req.eval_data}
    pairs = {k: read_pairs(p, role=req.role, need_output=req.target is None, limit=req.limit)
             for k, p in files.items() if p is not None}
    if req.target is None:
        return pairs
    tb = from_spec(req.target, dtype=req.dtype)
    gp = GenParams(max_new_tokens=req.target_tokens)
    pairs = {k: collect_pairs(tb, [p.prompt for p in v], gp, user_turn=req.system_query) for k, v in pairs.items()}
    if req.save_pairs is not None:
        with atomic_file(req.save_pairs) as tmp:
            tmp.write_text("".join(json.dumps({"prompt": p.prompt, "output": p.output, "split": k}) + "\n"
                                   for k, v in pairs.items() for p in v))
    return pairs


def _evaluate_existing(req: InvertRun, pairs: list[Pair]) -> dict:
    """Scores of an existing inverter (``adapter`` on ``model``, and the bare model zero-shot), or of ``model`` itself."""
    from slmkit.train.adapters import AdapterSet

    aset = AdapterSet.from_spec(req.model, dtype=req.dtype)
    if req.adapter is None:
        return evaluate(pairs, {"inverter": from_model(aset.base, aset.tokenizer, name=req.model)}, req.invert)
    methods: dict = {}
    aset.add("inverter", req.adapter)
    if req.zero_shot:
        with aset.use(None) as bare:
            methods.update(evaluate(pairs, {"zero_shot": bare}, req.invert))
    with aset.use("inverter") as inverter:
        methods.update(evaluate(pairs, {"inverter": inverter}, req.invert))
    return methods


def run_inversion(req: InvertRun) -> dict:
    """Run ``req``; return what the CLI prints (``methods``: each method's token F1 / exact match)."""
    if req.output is not None:
        check_training_output(req.output, req.force)
    pairs = _pairs(req)
    result: dict = {"model": req.model, "adapter": None if req.adapter is None else str(req.adapter), "target": req.target}
    if req.train is None:  # evaluate an existing inverter (and, with adapter, the bare model under it zero-shot)
        result.update(data=str(req.eval_data), n=len(pairs["eval"]), methods=_evaluate_existing(req, pairs["eval"]))
        return result

    from slmkit.models import load

    m, tok = load(req.model, dtype=req.dtype)
    before = None
    if "eval" in pairs and req.zero_shot:  # the untrained model, before adapters are injected or weights move
        before = evaluate(pairs["eval"], {"zero_shot": from_model(m, tok, name=req.model)}, req.invert)
    t0 = time.perf_counter()
    res = train_inverter(m, tok, pairs["train"], req.sft, checkpoint_dir(req.output), req.invert)
    result.update(output=str(req.output), kind="model" if (req.full or req.merge) else "adapter",
                  train_pairs=len(pairs["train"]), steps=res.steps, train_loss=res.train_loss,
                  seconds=round(time.perf_counter() - t0, 1))
    metrics: dict = {"train_loss": res.train_loss}
    if "eval" in pairs:
        after = evaluate(pairs["eval"], {"inverter": from_model(res.model, tok, name=str(req.output))}, req.invert)
        result["methods"] = {**(before or {}), **after}  # first_sentence, zero_shot, inverter
        result.update(data=str(req.eval_data), n=len(pairs["eval"]))
        metrics["eval"] = {k: {f: v[f] for f in ("token_f1", "exact_match", "n")} for k, v in result["methods"].items()}
    manifest = Manifest(source=req.model, metrics=metrics)
    manifest.add_stage("invert-train", {"invert": req.invert, "sft": req.sft}, data=str(req.train), target=req.target,
                       system_query=req.system_query, pairs=len(pairs["train"]), steps=res.steps, merged=req.merge)
    save_trained(res.model, tok, req.output, manifest, merge=req.merge, force=req.force)
    finish_checkpoints(checkpoint_dir(req.output))
    return result

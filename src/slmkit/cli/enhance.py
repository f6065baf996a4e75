"""Enhancement verbs: sft (also on retrieved passages: --rag), dpo. The rag verbs are in slmkit.cli.rag."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import (DEVICE_HELP, DTYPE_HELP, FORCE_HELP, PRECISION_HELP, RegistryHelpCommand, console,
                                kv_table, mixed_precision, print_json, registry_names)
from slmkit.cli.progress import quiet_libraries, with_progress
from slmkit.progress import trainer_callback

MODEL_HELP = "default | hub id | directory | file.gguf"


def register(app: typer.Typer) -> None:
    app.command("sft")(with_progress("sft")(sft))
    app.command("dpo", cls=RegistryHelpCommand)(with_progress("dpo")(dpo))
    from slmkit.cli import rag  # the rag verbs (slmkit rag index / ask) live in their own module

    rag.register(app)


def _training_device(device: str):
    """``--device`` for a Trainer verb: the device, checked (exit 2 naming the flag when it is not there)."""
    from slmkit.models.device import resolve_device, training_device_check

    dev = resolve_device(device)
    training_device_check(dev)
    return dev


def _lora(lora: bool, r: int, alpha: Optional[float]):
    from slmkit.train.sft import LoraSettings

    return LoraSettings(r=r, alpha=alpha if alpha is not None else 2.0 * r) if lora else None


def _report(title: str, result: dict, json_out: bool) -> None:
    if json_out:
        print_json(result)
    else:
        console.print(kv_table(title, [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()]))


def sft(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help='jsonl of {"messages": [...]} or {"prompt", "completion"}; '
                                                  'with --rag: {"question", "answer", "passage_id"?}'),
    output: Path = typer.Option(..., "--output", help="directory to write (adapter, or model with --merge / full FT)"),
    rag: Optional[Path] = typer.Option(None, "--rag", help="an index: train on question + retrieved passages "
                                                          "(the answer's passage among distractors) -> answer"),
    rag_k: int = typer.Option(4, "--rag-k", min=1, help="--rag: sources per training prompt (gold + distractors)"),
    rag_cloze: int = typer.Option(0, "--rag-cloze", min=0, help="--rag: also train on N blanked-phrase questions per "
                                                                "chunk of each passage the QA file names (its passage_id)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    lora: bool = typer.Option(False, "--lora", help="train LoRA adapters; the base stays frozen"),
    merge: bool = typer.Option(False, "--merge", help="with --lora: fold the adapters into the weights and write a model"),
    max_steps: int = typer.Option(100, "--max-steps", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 2e-4 LoRA, 2e-5 full)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    max_length: int = typer.Option(512, "--max-length", min=8, help="tokens per (packed) sequence"),
    packing: bool = typer.Option(True, "--packing/--no-packing"),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="default 2 * r"),
    save_steps: int = typer.Option(50, "--save-steps", min=0, help="checkpoint every N steps (0: none)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in OUTPUT.checkpoints"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N examples only (0 = all)"),
    seed: int = typer.Option(0, "--seed"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (a GPU other than the first: CUDA_VISIBLE_DEVICES)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Supervised fine-tuning on chat data (loss on assistant tokens only)."""
    from slmkit.artefact import Manifest
    from slmkit.errors import ConfigError
    from slmkit.models import load
    from slmkit.train.records import read_sft
    from slmkit.train.sft import SFTConfig, assistant_loss, check_training_output, checkpoint_dir, finish_checkpoints, save_trained
    from slmkit.models.device import resolve_dtype
    from slmkit.train.sft import sft as run

    if merge and not lora:
        raise ConfigError("--merge needs --lora (full fine-tuning already writes a model)")
    dev = _training_device(device)
    cfg = SFTConfig(lora=_lora(lora, lora_r, lora_alpha), max_steps=max_steps, learning_rate=lr, batch_size=batch_size,
                    grad_accum=grad_accum, max_length=max_length, packing=packing, save_steps=save_steps, seed=seed,
                    bf16=mixed_precision(precision, dev))
    rag_info = {}
    if rag is not None:
        convs, rag_info = _rag_conversations(rag, data, limit, rag_k, seed, rag_cloze)
    else:
        convs = read_sft(data, limit=limit)
    check_training_output(output, force)
    quiet_libraries()
    m, tok = load(model, dtype=resolve_dtype(dtype, dev), device=dev)
    if rag is not None:
        rag_info["rag_too_long"] = _check_rag_lengths(tok, convs, max_length)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        res = run(m, tok, convs, cfg, checkpoint_dir(output), resume=resume, callbacks=[trainer_callback()])
    seconds = time.perf_counter() - t0
    loss = assistant_loss(res.model, tok, convs[:64], max_length=max_length)
    manifest = Manifest(source=model, metrics={"train_loss": res.train_loss, "assistant_loss_first64": loss})
    manifest.add_stage("sft", cfg, data=str(data), examples=len(convs), steps=res.steps, merged=merge, **rag_info)
    with contextlib.redirect_stdout(sys.stderr):
        save_trained(res.model, tok, output, manifest, merge=merge, force=force)
    finish_checkpoints(checkpoint_dir(output))
    kind = "adapter" if lora and not merge else "model"
    _report(f"sft {model}", {"output": str(output), "kind": kind, "examples": len(convs), "steps": res.steps,
                             "train_loss": res.train_loss, "assistant_loss": loss, "seconds": round(seconds, 1), **rag_info},
            json_out)


def _check_rag_lengths(tok, convs: list, max_length: int) -> int:
    """How many ``--rag`` conversations exceed ``--max-length`` (their reply would be cut off); all of them: exit 2."""
    from slmkit.errors import ConfigError
    from slmkit.train.sft import tokenize_chat

    lengths = sorted(len(tokenize_chat(tok, c)["input_ids"]) for c in convs)
    too_long = sum(n > max_length for n in lengths)
    if too_long == len(lengths):
        raise ConfigError(f"every --rag training conversation is longer than --max-length {max_length} tokens "
                          f"(shortest {lengths[0]}), so no answer would be trained on",
                          f"raise --max-length to about {lengths[len(lengths) // 2]} (the median) or lower --rag-k")
    return too_long


def _rag_conversations(index: Path, data: Path, limit: int, k: int, seed: int, cloze: int = 0) -> tuple[list, dict]:
    """``sft --rag``: training conversations from a QA file and an index (slmkit.rag.train); ``cloze`` extra
    blanked-phrase questions per chunk of the passages the QA file names."""
    from slmkit.rag.embed import Embedder
    from slmkit.rag.index import VectorIndex
    from slmkit.rag.train import RAGTrainConfig, rag_conversations, read_qa, training_rows

    idx = VectorIndex.open(index)
    rows, added = training_rows(read_qa(data, limit), idx, cloze, seed)
    emb = Embedder.load(idx.embedder_identity["spec"]) if idx.retriever.needs_embedder else None
    built = rag_conversations(rows, idx, emb, RAGTrainConfig(k=k, search=max(20, k), seed=seed))
    return built.conversations, {"rag_index": str(index), "rag_k": k, "rag_skipped": built.skipped, "rag_cloze": added}


def dpo(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help='jsonl of {"prompt", "chosen", "rejected"} (or hh-rlhf with --hh)'),
    output: Path = typer.Option(..., "--output"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    method: str = typer.Option("dpo", "--method", help=registry_names("slmkit.train.dpo", "PREFERENCE_METHODS") + " (simpo is reference-free)"),
    hh: bool = typer.Option(False, "--hh", help="data is hh-rlhf style {chosen, rejected} dialogues"),
    lora: bool = typer.Option(False, "--lora", help="train LoRA adapters (DPO's reference = adapters off)"),
    merge: bool = typer.Option(False, "--merge", help="with --lora: write a merged model instead of an adapter"),
    beta: Optional[float] = typer.Option(None, "--beta", help="default 0.1 (dpo), 2.0 (simpo)"),
    max_steps: int = typer.Option(50, "--max-steps", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 5e-5 LoRA, 1e-6 full)"),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    max_length: int = typer.Option(512, "--max-length", min=8),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="held-out pairs for reward accuracy (default: the training pairs)"),
    save_steps: int = typer.Option(50, "--save-steps", min=0),
    resume: bool = typer.Option(False, "--resume"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N pairs only (0 = all)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (a GPU other than the first: CUDA_VISIBLE_DEVICES)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Preference optimisation (DPO or SimPO); reports reward accuracy and margin."""
    import copy

    from slmkit.artefact import Manifest
    from slmkit.errors import ConfigError
    from slmkit.models import load
    from slmkit.train.dpo import PreferenceConfig, preference_metrics, preference_train, read_hh
    from slmkit.train.records import read_preferences
    from slmkit.train.sft import check_training_output, checkpoint_dir, finish_checkpoints, save_trained

    if merge and not lora:
        raise ConfigError("--merge needs --lora (full fine-tuning already writes a model)")
    dev = _training_device(device)
    cfg = PreferenceConfig(method=method, beta=beta, lora=_lora(lora, lora_r, None), max_steps=max_steps,
                           learning_rate=lr, batch_size=batch_size,
                           max_length=max_length, save_steps=save_steps, seed=seed)

    def read(path):
        return read_hh(path, limit=limit) if hh else read_preferences(path, limit=limit)

    pairs = read(data)
    held = read(eval_data) if eval_data is not None else pairs[:64]
    check_training_output(output, force)
    quiet_libraries()
    m, tok = load(model, device=dev)  # fp32 weights: DPO's log-ratio margins are small
    ref = copy.deepcopy(m) if (method == "dpo" and not lora) else None
    before = preference_metrics(m, tok, held, cfg, reference=None)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        res = preference_train(m, tok, pairs, cfg, checkpoint_dir(output), resume=resume, callbacks=[trainer_callback()])
    seconds = time.perf_counter() - t0
    after = preference_metrics(res.model, tok, held, cfg, reference="adapters-off" if lora else ref)
    manifest = Manifest(source=model, metrics={"before": before, "after": after})
    manifest.add_stage(method, cfg, data=str(data), pairs=len(pairs), steps=res.steps)
    with contextlib.redirect_stdout(sys.stderr):
        save_trained(res.model, tok, output, manifest, merge=merge, force=force)
    finish_checkpoints(checkpoint_dir(output))
    result = {"output": str(output), "method": method, "pairs": len(pairs), "steps": res.steps, "train_loss": res.train_loss,
              "eval_pairs": len(held), "reward_accuracy": after["reward_accuracy"], "reward_margin": after["reward_margin"],
              "logp_accuracy_before": before["logp_accuracy"], "logp_accuracy": after["logp_accuracy"],
              "seconds": round(seconds, 1)}
    _report(f"{method} {model}", result, json_out)

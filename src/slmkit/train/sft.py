"""Supervised fine-tuning (SFT) on chat data: full fine-tuning or LoRA, through TRL's ``SFTTrainer``.

Conversations are rendered with the tokenizer's chat template and the loss is
taken on assistant tokens only: :func:`tokenize_chat` finds each assistant
turn's character span by rendering the conversation up to that turn with and
without it, and labels every other token ``-100``. This works for any
prefix-preserving template (no ``{% generation %}`` markers needed).
Tool-use conversations (``{"messages", "tools"}``, see :mod:`slmkit.train.records`) are rendered
as the server renders a request (:func:`slmkit.runtime.tools.render`: the template's own tool
support, or the documented fallback prompt); the assistant's calls and answers are trained, the
system prompt listing the functions, the user turns and the ``tool`` results are not.
Sequences can be packed (TRL's best-fit-decreasing packing; attention stays
within each packed example through position ids). On the CPU the loss runs the LM head on the
labelled positions only (:func:`labelled_loss`); TRL's fused head scores every position there.

LoRA: Hu et al. 2021 (arXiv:2106.09685), ``W x + (alpha / r) B A x`` with
``A`` (r, in) and ``B`` (out, r), from PEFT. QLoRA (Dettmers et al. 2023)
stores the frozen base in 4 bits with bitsandbytes kernels, which need a GPU;
on CPU the nearest equivalent is LoRA over a base whose weights already lie on
a 4-bit grid, which is what the default model is (dequantised from Q4_1).

Checkpoints go to ``<output>.checkpoints/`` every ``save_steps`` steps, beside the run's
identity (``run.json``: the starting weights' hash, the data's hash, the settings);
``resume=True`` continues from the newest complete one, and refuses another run's
(:func:`slmkit.train.checkpoints.prepare_run`). The final artefact is written
atomically: a merged model directory, or a PEFT adapter directory, both with
an ``slmkit.json`` manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.artefact import MANIFEST, Manifest, atomic_dir, check_output, save_model
from slmkit.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (PEFT ``LoraConfig``)."""

    r: int = 8  #: rank of A and B
    alpha: float = 16.0  #: scale is alpha / r
    dropout: float = 0.0  #: dropout on the adapter input
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  #: linear layers that get an adapter (by name suffix)

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules must name at least one module")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class SFTConfig:
    """Knobs of :func:`sft`."""

    lora: LoraSettings | None = None  #: None = full fine-tuning
    max_steps: int = 100  #: optimizer steps
    learning_rate: float | None = None  #: default 2e-4 with LoRA, 2e-5 for full fine-tuning
    batch_size: int = 4  #: sequences (or packed rows) per step
    grad_accum: int = 1  #: micro-batches per optimizer step
    max_length: int = 512  #: tokens per sequence (packed row length when packing)
    packing: bool = True  #: pack several conversations into one row
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 50  #: checkpoint every N steps (0 = only at the end of training)
    logging_steps: int = 10
    seed: int = 0
    bf16: bool = False  #: bf16 autocast over the weights' dtype (GPUs; CPUs with AVX512-BF16 / AMX: ~2x here)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.save_steps < 0 or self.logging_steps < 1 or self.warmup_steps < 0:
            raise ConfigError("save_steps and warmup_steps must be >= 0, logging_steps >= 1")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.lora is not None else 2e-5


@dataclass
class SFTResult:
    model: object  #: the trained model (a PeftModel when LoRA was used)
    steps: int
    train_loss: float
    log_history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- formatting


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedModelError(
            "the tokenizer has no chat template, so conversations cannot be formatted for SFT",
            "use an instruction-tuned model's tokenizer, or set tokenizer.chat_template before training",
        )


def _renderer(tokenizer, tools: list[dict] | None):
    """``render(messages, add_generation_prompt) -> text``: the chat template, or with ``tools`` the server's tool rendering."""
    if tools is None:
        return lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    from slmkit.runtime.tools import render

    return lambda msgs, gen: render(tokenizer, msgs, tools, add_generation_prompt=gen)


def assistant_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn.

    A turn's span starts where the template's generation prompt ends and runs
    to the end of the rendered turn (so the end-of-turn token is trained).
    ``tools`` (a tool-use conversation, possibly ``[]``): rendered by :func:`slmkit.runtime.tools.render`.
    """
    require_chat_template(tokenizer)
    render = _renderer(tokenizer, tools)
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UnsupportedModelError(
                "the chat template is not prefix-preserving (rendering a conversation up to a turn does not "
                "give a prefix of the whole), so assistant tokens cannot be located",
                "use a template that renders earlier turns identically whatever follows",
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_chat(tokenizer, conversation: list[dict] | dict) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` with labels ``-100`` on every token outside an assistant turn.

    ``conversation``: a list of messages, or a tool-use row ``{"messages", "tools"}``.
    """
    if isinstance(conversation, dict):
        text, spans = assistant_spans(tokenizer, conversation["messages"], conversation["tools"])
    else:
        text, spans = assistant_spans(tokenizer, conversation)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tid, (start, _end) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tid if inside else -100)
    return {"input_ids": ids, "labels": labels}


def build_dataset(tokenizer, conversations: list):
    """A ``datasets.Dataset`` of tokenized conversations (columns input_ids, labels)."""
    from datasets import Dataset

    rows = [tokenize_chat(tokenizer, msgs) for msgs in conversations]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def assistant_loss(model, tokenizer, conversations: list, max_length: int = 512, batch_size: int = 4) -> float:
    """Mean cross-entropy (nats per token) over assistant tokens only, conversations unpacked."""
    rows = [tokenize_chat(tokenizer, msgs) for msgs in conversations]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for b in range(0, len(rows), batch_size):
        batch = [{k: v[:max_length] for k, v in r.items()} for r in rows[b : b + batch_size]]
        L = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        lab = torch.full((len(batch), L), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            lab[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        tgt = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((tgt != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------- training


def checkpoint_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".checkpoints")


def _holds_checkpoints(path: Path) -> bool:
    """A run's checkpoint directory: it carries slmkit's ``run.json`` (next to the Trainer's
    checkpoints and model card), or holds nothing but ``checkpoint-N`` directories and the card."""
    from slmkit.train.checkpoints import RUN_FILE

    run = path / RUN_FILE
    if run.is_file() and not run.is_symlink():
        return True
    return all(p.name.startswith(("checkpoint-", f".{RUN_FILE}.tmp-")) or p.name == "README.md" for p in path.iterdir())


def check_training_output(output: str | Path, force: bool = False) -> None:
    """Before training: refuse an ``output`` (or its ``OUTPUT.checkpoints``) that slmkit did not write.

    Checked up front so a long run does not end in a refusal; ``force`` allows both
    (see :func:`slmkit.artefact.check_output`).
    """
    check_output(output, force)
    check_output(checkpoint_dir(output), force, owned=_holds_checkpoints)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """Newest *complete* checkpoint in ``directory``; half-written ones are logged and removed."""
    from slmkit.train.checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(directory)


def run_identity(kind: str, model, rows, cfg) -> dict:
    """What a resumed run must share with the run that wrote the checkpoints: the trainer kind, the
    starting weights (sha256 of every tensor), the training rows (sha256) and the settings, less
    the step budget and the save / logging cadence (a run may be extended)."""
    from dataclasses import asdict

    from slmkit.train.checkpoints import rows_sha256, weights_sha256

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("max_steps", "save_steps", "logging_steps")}
    return json.loads(json.dumps({"kind": kind, "model_sha256": weights_sha256(model), "data_sha256": rows_sha256(rows),
                                  "rows": len(rows), "config": settings}, default=str))


def trainer_args(cfg, ckpt: Path, model, bf16: bool = False) -> dict:
    """Training arguments common to SFT and preference trainers (:func:`slmkit.train.args.trainer_arguments`:
    no reporting; training stays on ``model``'s device, the CPU or the first visible GPU)."""
    from slmkit.train.args import trainer_arguments

    return dict(
        trainer_arguments(ckpt, model, max_steps=cfg.max_steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                          learning_rate=cfg.lr, save_steps=cfg.save_steps, logging=cfg.logging_steps, seed=cfg.seed,
                          warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                          bf16=bf16),  # explicit: TRL's own default is bf16 autocast (run_trainer unwraps it)
        gradient_checkpointing=False,
    )


def sft(
    model,
    tokenizer,
    conversations: list,
    cfg: SFTConfig,
    checkpoints: str | Path,
    resume: bool = False,
    callbacks: list | None = None,
) -> SFTResult:
    """Fine-tune ``model`` on ``conversations`` (loss on assistant tokens only): lists of messages,
    or tool-use rows ``{"messages", "tools"}`` (:func:`slmkit.train.records.read_sft`).

    With ``cfg.lora`` the base weights are frozen and the returned model is a
    PEFT model wrapping ``model``; otherwise ``model`` is trained in place.
    ``checkpoints`` receives Trainer checkpoints; ``resume`` continues from the
    newest one there (a fresh start when there is none).
    """
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    require_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    identity = run_identity("sft", model, conversations, cfg)
    dataset = build_dataset(tokenizer, conversations)
    ckpt = Path(checkpoints)
    args = TRLSFTConfig(
        **trainer_args(cfg, ckpt, model, bf16=cfg.bf16),
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",
        shuffle_dataset=True,
    )
    model.train()
    trainable_marker(model)
    # packed rows are kept apart by position ids, which transformers only honours without a KV cache
    use_cache = model.config.use_cache
    model.config.use_cache = False
    trainer = _trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=cfg.lora.peft_config() if cfg.lora is not None else None,
        callbacks=callbacks,
    )
    return SFTResult(*run_trainer(trainer, model, ckpt, resume, use_cache, identity))


def labelled_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, int, int]:
    """Next-token cross-entropy over the labelled positions only: ``(loss, tokens predicted right, tokens)``.

    The LM head runs on the positions whose next token any row of the batch trains (the model's own
    ``logits_to_keep``, so soft-capping and logit scales stay the model's), not on every position: assistant-only SFT
    labels a few percent of a RAG conversation's tokens, and a 262k-entry head (Gemma 3) over all of them costs more
    than the whole transformer body. The loss is summed and divided by ``num_items_in_batch`` when the Trainer counts
    the labelled tokens of the accumulated batch, else by this batch's count, as TRL's own loss is.
    """
    labels = inputs["labels"]
    target = labels[:, 1:]
    trained = target != -100
    at = trained.any(0).nonzero().squeeze(-1)  # positions whose next token some row trains
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=at).logits
    if logits.shape[1] != at.numel():
        raise UnsupportedModelError(f"{type(model).__name__} ignores logits_to_keep (returned {logits.shape[1]} positions, "
                                    f"asked for {at.numel()})", "train it on a GPU, where TRL's loss is used")
    picked = target[:, at]
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), picked.flatten(), ignore_index=-100, reduction="sum")
    n = int(trained.sum())
    count = num_items_in_batch if num_items_in_batch is not None else n
    correct = int(((logits.argmax(-1) == picked) & (picked != -100)).sum())
    return total / torch.as_tensor(count, device=total.device).clamp(min=1), correct, n


def _trainer_class(base):
    """``base`` (TRL's ``SFTTrainer``) with :func:`labelled_loss` where TRL would score every position.

    TRL's fused LM head scores only the labelled positions on devices with Triton (CUDA, XPU); elsewhere (the CPU)
    it projects every position onto the vocabulary in vocabulary tiles, which took 80% of a Gemma 3 270M LoRA step
    here. TRL's own loss still runs for what this one does not do (a custom loss, label smoothing, DFT, MoE auxiliary
    losses, returned outputs). Logged on the CPU path: ``mean_token_accuracy``, not TRL's ``entropy`` or ``num_tokens``.
    """

    class Trainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            own = not (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                       or self.args.loss_type != "nll" or self.aux_loss_enabled)
            if not own or next(model.parameters()).device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, correct, n = labelled_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients; as TRL's compute_loss
            mode = "train" if model.training else "eval"
            # gather, not gather_for_metrics: that one cuts the last batch's gathered rows to the dataset's remainder
            totals = self.accelerator.gather(torch.tensor([correct, n], device=loss.device)).view(-1, 2).sum(0)
            self._metrics[mode]["mean_token_accuracy"].append(float(totals[0] / totals[1]) if totals[1] > 0 else 0.0)
            return loss

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def run_trainer(trainer, model, ckpt: Path, resume: bool, use_cache: bool, identity: dict):
    """Train (from the latest complete checkpoint in ``ckpt`` when ``resume``, after checking that
    ``ckpt`` holds the run ``identity`` names), restore ``use_cache``; returns (trained model in
    eval mode, steps, final training loss, log history)."""
    from accelerate.utils import extract_model_from_parallel

    from slmkit.train.checkpoints import mean_logged_loss, prepare_run, train_from
    from slmkit.train.dist import on_main

    quiet(trainer)
    try:
        start = on_main(lambda: prepare_run(ckpt, identity, resume, existing="replace"))  # the main process writes run.json
    except BaseException:
        model.config.use_cache = use_cache
        raise
    if start is not None:
        log.info("resuming %s from %s", type(trainer).__name__, start)
    try:
        train_from(trainer, start)
    finally:
        model.config.use_cache = use_cache
    # mixed precision wraps the model's forward in autocast; the trained model is returned without it
    trained = extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False)
    trained.eval()
    loss = mean_logged_loss(trainer.state.log_history)  # over the whole run, resumed or not
    return trained, int(trainer.state.global_step), loss, list(trainer.state.log_history)


def trainable_marker(model) -> None:
    """GGUF weights are dequantised when loaded, but transformers may still flag the model as
    quantized without a quantizer, which its Trainer refuses; clear that stale flag (in place)."""
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None:
        model.is_quantized = False


def quiet(trainer) -> None:
    """Drop the Trainer's stdout printer (library code logs, it does not print)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_trained(model, tokenizer, dest: str | Path, manifest: Manifest, merge: bool = False,
                 force: bool = False) -> Path:
    """Write the result of :func:`sft` (or preference training) atomically to ``dest``.

    A PEFT model becomes an adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``, tokenizer, ``slmkit.json`` with the base
    model's fingerprint) unless ``merge``, which folds the adapters into the
    base weights and writes a plain model directory. ``force``: replace a
    directory slmkit did not write. Under ``accelerate launch`` the main process writes it.
    """
    from slmkit.train.dist import on_main

    return on_main(lambda: _write_trained(model, tokenizer, dest, manifest, merge, force))


def _write_trained(model, tokenizer, dest: str | Path, manifest: Manifest, merge: bool, force: bool) -> Path:
    from slmkit.train.adapters import base_fingerprint

    if is_peft(model):
        if merge:
            merged = model.merge_and_unload()
            return save_model(merged, tokenizer, dest, manifest, force=force)
        base = model.get_base_model()
        data = json.loads(manifest.to_json())
        data["base_model"] = {"name": str(base.config.name_or_path), "fingerprint": base_fingerprint(base)}
        with atomic_dir(dest, force=force) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(data, indent=2))
        return Path(dest)
    return save_model(model, tokenizer, dest, manifest, force=force)


def finish_checkpoints(checkpoints: str | Path) -> None:
    """Remove the checkpoint directory once the final artefact is safely written (``run.json`` last)."""
    from slmkit.train.checkpoints import finish_run
    from slmkit.train.dist import on_main

    on_main(lambda: finish_run(checkpoints))

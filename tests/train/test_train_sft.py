"""SFT: assistant-only labels, packing, LoRA (only adapters train; merge is exact), resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from slmkit.artefact import Manifest
from slmkit.errors import DataError, UnsupportedModelError
from slmkit.models import load
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.train.records import read_sft
from slmkit.train.sft import LoraSettings, SFTConfig, assistant_loss, save_trained, sft, tokenize_chat

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the cat?"},
    {"role": "assistant", "content": "The cat is near the house."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "A dog reads the old book."},
]


def toy_convs(n=12):
    subjects = ["the cat", "a dog", "my friend", "the model"]
    return [
        [
            {"role": "user", "content": f"Where is {subjects[i % 4]}?"},
            {"role": "assistant", "content": f"{subjects[i % 4].capitalize()} is {i} steps away, yes!"},
        ]
        for i in range(n)
    ]


def test_labels_cover_exactly_the_assistant_turns(tiny_tok):
    row = tokenize_chat(tiny_tok, CONV)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    # the labelled tokens, read in runs, are the two assistant turns with their end-of-turn marker
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(cur)
    assert [tiny_tok.decode(r) for r in runs] == [
        "The cat is near the house.<|im_end|>\n",
        "A dog reads the old book.<|im_end|>\n",
    ]
    # the whole sequence is the chat template's rendering
    assert tiny_tok.decode(ids) == tiny_tok.apply_chat_template(CONV, tokenize=False)


def test_loss_gradient_is_zero_outside_assistant_tokens(tiny_llama, tiny_tok):
    model, _ = tiny_llama
    row = tokenize_chat(tiny_tok, CONV)
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"]])
    logits = model(input_ids=ids).logits.detach().requires_grad_(True)  # (1, T, V)
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
    loss.backward()
    gnorm = logits.grad[0].abs().sum(-1)  # (T,) position t predicts token t+1
    target_is_assistant = torch.tensor(row["labels"][1:] + [-100]) != -100
    assert torch.all(gnorm[~target_is_assistant] == 0)
    assert torch.all(gnorm[target_is_assistant] > 0)
    # and the loss equals cross-entropy over the assistant targets computed from scratch
    lp = torch.log_softmax(logits[0, :-1].detach(), -1)
    tgt = torch.tensor(row["input_ids"][1:])
    mask = target_is_assistant[:-1]
    manual = -lp[torch.arange(len(tgt)), tgt][mask].mean()
    assert torch.allclose(loss.detach(), manual, atol=1e-5)


def test_labelled_loss_equals_the_full_logits_loss_with_its_gradients(tiny_llama, tiny_tok):
    """The CPU loss scores only the labelled positions; a right-padded batch of rows whose assistant turns sit at
    different positions gives the loss and the gradients of the full-logits loss (transformers' own)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from slmkit.train.sft import labelled_loss

    model, _ = tiny_llama
    rows = [tokenize_chat(tiny_tok, CONV), tokenize_chat(tiny_tok, toy_convs(1)[0])]
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tok.pad_token_id)(rows)
    assert batch["input_ids"].shape[1] > len(rows[1]["input_ids"])  # the short row is padded

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = model(**batch, use_cache=False).loss
    g_full = grads(full)
    mine, correct, n = labelled_loss(model, batch)
    g_mine = grads(mine)
    assert n == int((batch["labels"][:, 1:] != -100).sum()) and 0 <= correct <= n
    assert torch.allclose(mine, full, atol=1e-5)
    assert len(g_mine) == len(g_full) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_mine, g_full))
    # with the Trainer's token count of an accumulated batch, the sum is divided by that count instead
    half, _, _ = labelled_loss(model, batch, num_items_in_batch=2 * n)
    assert torch.allclose(half, full / 2, atol=1e-5)
    # a packed row (padding-free: position ids, no attention mask) as well
    packed = {"input_ids": sum((r["input_ids"] for r in rows), []), "labels": sum((r["labels"] for r in rows), []),
              "seq_lengths": [len(r["input_ids"]) for r in rows]}
    pb = DataCollatorForLanguageModeling(pad_token_id=tiny_tok.pad_token_id, padding_free=True)([packed])
    with torch.no_grad():
        assert torch.allclose(labelled_loss(model, pb)[0], model(**pb, use_cache=False).loss, atol=1e-5)
    model.zero_grad()


def test_packed_rows_keep_examples_apart(tiny_llama, tiny_tok):
    """Loss on a packed row (position ids restart per example) equals the loss of the examples alone."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, _ = tiny_llama
    rows = [tokenize_chat(tiny_tok, c) for c in toy_convs(3)]
    packed = {
        "input_ids": sum((r["input_ids"] for r in rows), []),
        "labels": sum((r["labels"] for r in rows), []),
        "seq_lengths": [len(r["input_ids"]) for r in rows],
    }
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tok.pad_token_id, padding_free=True)([packed])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    assert torch.allclose(logits, alone, atol=1e-4)


@pytest.fixture(scope="module")
def lora_run(tiny_tok, tmp_path_factory):
    base = tiny_model(tiny_llama_config(tiny_tok), seed=1)
    base.is_quantized = True  # what a GGUF-loaded (dequantised) model carries; the Trainer must still accept it
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = SFTConfig(lora=LoraSettings(r=4, alpha=8), max_steps=6, learning_rate=5e-3, batch_size=4, max_length=64, save_steps=0)
    res = sft(base, tiny_tok, toy_convs(), cfg, tmp_path_factory.mktemp("ck") / "c")
    return res, before, base


def test_lora_trains_only_adapter_parameters(lora_run):
    res, before, _ = lora_run
    model = res.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_sd = model.get_base_model().state_dict()
    for name, old in before.items():
        key = name.replace(".weight", ".base_layer.weight") if name.replace(".weight", ".base_layer.weight") in base_sd else name
        assert torch.equal(base_sd[key], old), f"base weight {name} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero, so training moved it


def test_lora_loss_drops_and_merge_gives_same_outputs(lora_run, tiny_tok, tmp_path):
    res, _, _ = lora_run
    convs = toy_convs()
    peft_model = res.model
    with peft_model.disable_adapter():
        loss_before = assistant_loss(peft_model, tiny_tok, convs)
    loss_after = assistant_loss(peft_model, tiny_tok, convs)
    assert loss_after < loss_before
    ids = torch.tensor([tokenize_chat(tiny_tok, convs[0])["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    # adapter directory: reloads through the AdapterSet to identical outputs
    from slmkit.train.adapters import AdapterSet

    adir = save_trained(peft_model, tiny_tok, tmp_path / "adapter", Manifest(source="tiny"))
    assert (adir / "adapter_config.json").is_file() and "base_model" in json.loads((adir / "slmkit.json").read_text())
    # merged model: a plain directory with the same outputs
    import copy

    mdir = save_trained(copy.deepcopy(peft_model), tiny_tok, tmp_path / "merged", Manifest(source="tiny"), merge=True)
    merged, _ = load(str(mdir))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())
    fresh = tiny_model(tiny_llama_config(tiny_tok), seed=1)
    aset = AdapterSet(fresh, tiny_tok)
    aset.add("u1", adir)
    with aset.use("u1") as backend, torch.no_grad():
        assert torch.allclose(backend.model(input_ids=ids).logits, want, atol=1e-5)


class _Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_bf16_autocast_trains_and_returns_a_full_precision_model(tiny_tok, tmp_path):
    """--precision bf16: the Trainer runs under bf16 autocast, but the returned model's forward is its own
    again (fp32 logits equal to a plain fp32 forward of the same weights, not the bf16-autocast ones)."""
    base = tiny_model(tiny_llama_config(tiny_tok), seed=1)
    cfg = SFTConfig(lora=LoraSettings(r=4, alpha=8), max_steps=3, learning_rate=5e-3, batch_size=4, max_length=64,
                    save_steps=0, bf16=True)
    res = sft(base, tiny_tok, toy_convs(), cfg, tmp_path / "c")
    assert res.steps == 3 and res.train_loss == res.train_loss
    ids = torch.tensor([tiny_tok("the cat sat on the mat").input_ids])
    with torch.no_grad():
        logits = res.model(input_ids=ids).logits
        merged = res.model.merge_and_unload()
        plain = merged(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = merged(input_ids=ids).logits
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, plain, atol=1e-5)
    assert not torch.allclose(logits, autocast.float(), atol=1e-5)  # the check above can tell the two apart


def test_interrupted_training_resumes_to_the_same_weights(tiny_tok, tmp_path):
    cfg = SFTConfig(max_steps=4, save_steps=2, learning_rate=1e-3, batch_size=1, max_length=32)
    convs = toy_convs(4)
    straight = sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "a").model
    with pytest.raises(KeyboardInterrupt):
        sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", callbacks=[_Stop()])
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    res = sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", resume=True)
    assert res.steps == 4
    for (n, p), q in zip(straight.named_parameters(), res.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_bad_sft_data_names_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: messages\[0\] is missing field 'content'"):
        read_sft(f)
    f.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'completion'"):
        read_sft(f)
    f.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'messages'"):
        read_sft(f)
    f.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    assert read_sft(f) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]]


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    with pytest.raises(UnsupportedModelError, match="no chat template"):
        tokenize_chat(tok, CONV)


@pytest.mark.integration
def test_default_model_template_masks_assistant_turns():
    """SmolLM2's template (which injects a default system prompt) is prefix-preserving: masking works."""
    from slmkit.models import load_tokenizer

    tok = load_tokenizer("default")
    row = tokenize_chat(tok, CONV[1:])
    labelled = tok.decode([t for t in row["labels"] if t != -100])
    assert labelled == "The cat is near the house.<|im_end|>\nA dog reads the old book.<|im_end|>\n"

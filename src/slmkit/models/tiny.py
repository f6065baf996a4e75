"""Tiny randomly initialised models and a tiny tokenizer, for tests and smoke runs.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in
process on text generated from templates, and the models are transformers
configs with hidden size 64 and a few layers.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SUBJECTS = ["the cat", "a dog", "my friend", "the model", "paris", "the river", "a teacher", "the small bird"]
_VERBS = ["sees", "likes", "finds", "answers", "reads", "follows", "writes", "is near"]
_OBJECTS = ["the house", "a question", "the capital of france", "green apples", "the old book", "a bright star"]


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic template sentences (the training text of the tiny tokenizer)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}. "
        f"It is {rng.randint(1, 99)} steps away, {rng.choice(['yes', 'no', 'maybe'])}!"
        for _ in range(n)
    ]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (GPT-2 style) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_llama_config(tokenizer=None, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **kw):
    from transformers import LlamaConfig

    vocab = len(tokenizer) if tokenizer is not None else 384
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=kw.pop("max_position_embeddings", 512),
        tie_word_embeddings=kw.pop("tie_word_embeddings", True),
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else None,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None,
        **kw,
    )


def tiny_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM for ``config`` (deterministic given ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny(model, tokenizer, directory: str | Path) -> Path:
    """Save a tiny model as a plain Hugging Face directory (safetensors)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

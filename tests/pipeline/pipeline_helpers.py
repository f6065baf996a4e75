"""Recipe snippets over the tiny test model, shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path


def tiny_recipe(teacher: Path, *stages: str, name: str = "tiny") -> str:
    """A recipe text over the tiny model; each stage is a YAML block (already indented by 2)."""
    return f"name: {name}\nteacher: {teacher}\nseed: 0\nstages:\n" + "".join(stages)


GEN = "  - stage: gen-data\n    n: {n}\n    max_new_tokens: {tokens}\n    temperature: 1.0\n    holdout: 0.25\n"
STUDENT = "  - stage: student\n"
EXPORT = "  - stage: export\n    format: gguf\n    type: {type}\n"
PRUNE = "  - stage: prune\n    method: width\n    ratio: 0.8\n    calib_samples: 4\n    calib_len: 32\n"
QUANT = "  - stage: quantize\n    method: gptq\n    gguf: Q4_0\n    calib_samples: 4\n    calib_len: 32\n"
SPEC = "  - stage: speculative\n    prompts: 2\n    max_new_tokens: 8\n"
EVAL = "  - stage: eval\n    max_tokens: 96\n    context: 32\n    efficiency: {eff}\n    prompt_tokens: 8\n    new_tokens: 4\n"

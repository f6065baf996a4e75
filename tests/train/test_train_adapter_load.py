"""An adapter directory (LoRA, unmerged) loads as its base model with the adapter merged."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.errors import ModelNotFoundError
from slmkit.models import load


def _adapter(tiny_dir, tmp_path, source: str | None):
    from peft import LoraConfig, get_peft_model

    base, tok = load(str(tiny_dir))
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-zero update, so the adapter changes the outputs
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    tok.save_pretrained(out)
    if source is not None:
        (out / "slmkit.json").write_text(json.dumps({"source": source, "stages": [{"stage": "sft"}]}))
    return peft.eval(), out


def test_adapter_dir_loads_merged_on_its_base(tiny_dir, tmp_path):
    peft, path = _adapter(tiny_dir, tmp_path, source=str(tiny_dir))
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft(ids).logits
        base = load(str(tiny_dir))[0](ids).logits
    model, tok = load(str(path))
    with torch.no_grad():
        got = model(ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert tok is not None and model.config.name_or_path == str(path)


def test_adapter_without_a_base_is_a_clear_error(tiny_dir, tmp_path):
    _, path = _adapter(tiny_dir, tmp_path, source=None)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError, match="names no base model"):
        load(str(path))

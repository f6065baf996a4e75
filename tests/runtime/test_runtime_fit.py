"""The fit planner: its terms against from-scratch numbers, monotonicity, presets, and the CLI."""

import json

import pytest

from slmkit.errors import ConfigError
from slmkit.runtime import fit as F


def _sizes(tiny_dir):
    from slmkit.models import describe, load_config

    return F.Sizes.of(describe(load_config(str(tiny_dir))))


def test_parse_sizes_and_tokens():
    assert F.parse_size("4GB") == 4_000_000_000
    assert F.parse_size("512MB") == 512_000_000
    assert F.parse_size("2GiB") == 2 * 1024**3
    assert F.parse_tokens("8k") == 8192 and F.parse_tokens("2048") == 2048
    with pytest.raises(ConfigError, match="memory size"):
        F.parse_size("lots")
    with pytest.raises(ConfigError, match="precision"):
        F.FitConfig.parse(memory="1GB", precision="int3")
    with pytest.raises(ConfigError, match="kv policy"):
        F.FitConfig.parse(memory="1GB", kv="nope")


def test_terms_match_a_hand_computation(tiny_dir):
    s = _sizes(tiny_dir)  # 2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16
    cfg = F.FitConfig.parse(memory="1GB", context="256", precision="fp32", kv="full", overhead="0")
    w, k, a, total = F.estimate(s, cfg)
    assert w == s.parameters * 4
    assert k == 2 * 2 * 2 * 16 * 256 * 4  # K and V x layers x kv_heads x head_dim x tokens x fp32
    int8 = F.FitConfig.parse(memory="1GB", context="256", precision="bf16", kv="int8", overhead="0")
    assert F.estimate(s, int8)[1] == 2 * 2 * 2 * 256 * (16 + 4)  # codes + fp16 scale + fp16 offset
    stream = F.FitConfig.parse(memory="1GB", context="256", precision="bf16", kv="streaming", kv_budget=64, overhead="0")
    assert F.estimate(s, stream)[1] == 2 * 2 * 2 * 16 * 64 * 2
    assert total == w + k + a


def test_kv_estimate_equals_a_real_cache(lively, tiny_dir):
    from slmkit.runtime import generate as G

    s = _sizes(tiny_dir)
    fm = G.build(lively[0], G.FastConfig(dtype="bf16"))
    for kv, budget in [("full", None), ("int4", None), ("h2o", 32)]:
        cache = fm.new_cache(kv, context=200, budget=budget)
        assert F.kv_bytes(s, "bf16", kv, budget, 200) == cache.nbytes()


def test_largest_context_and_batch_are_tight(tiny_dir):
    s = _sizes(tiny_dir)
    cfg = F.FitConfig.parse(memory="3MB", context="256", precision="fp32", overhead="0")
    res = F.plan_sizes(s, cfg)
    if res.max_context < (s.context or 0):
        assert F.estimate(s, cfg, context=res.max_context, batch=1)[3] <= cfg.memory_bytes
        assert F.estimate(s, cfg, context=res.max_context + 1, batch=1)[3] > cfg.memory_bytes
    assert res.max_batch >= 1
    assert F.estimate(s, cfg, batch=res.max_batch)[3] <= cfg.memory_bytes < F.estimate(s, cfg, batch=res.max_batch + 1)[3]
    assert res.fits == (res.total_bytes <= cfg.memory_bytes)


def test_device_presets_and_cli(tiny_dir, capsys):
    from slmkit.cli import main

    assert {"phone-4gb", "phone-8gb", "rpi5-8gb", "laptop-16gb"} <= set(F.DEVICES)
    assert main(["fit", str(tiny_dir), "--memory", "phone-4gb", "--context", "8k", "--precision", "int4", "--kv", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "phone-4gb" and out["memory_bytes"] == F.DEVICES["phone-4gb"].usable_bytes
    assert out["total_bytes"] == out["weights_bytes"] + out["kv_bytes"] + out["activation_bytes"] + out["overhead_bytes"]
    assert out["fits"] is True
    assert out["kernel"] == "neon" and "dot product" in out["kernel_cpu"]
    assert main(["fit", str(tiny_dir), "--memory", "ten", "--json"]) == 2


def test_presets_say_which_kernel_runs(tiny_dir, capsys, monkeypatch):
    """Each preset names its kernel variant (one slmkit builds); a custom budget reports this machine's choice."""
    from slmkit.cli import main
    from slmkit.runtime import q4kernel

    assert {d.kernel for d in F.DEVICES.values()} <= set(q4kernel.VARIANTS)
    assert F.DEVICES["laptop-16gb"].kernel == "avx2" and F.DEVICES["rpi5-8gb"].kernel == "neon"
    monkeypatch.delenv("SLMKIT_KERNEL", raising=False)
    assert main(["fit", str(tiny_dir), "--memory", "2GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernel"] == q4kernel.choose() and out["kernel_cpu"] == "this machine"
    monkeypatch.setenv("SLMKIT_KERNEL", "portable")
    assert main(["fit", str(tiny_dir), "--memory", "laptop-16gb"]) == 0
    table = capsys.readouterr().out
    assert "avx2" in table and "AVX2, FMA, F16C" in table
    assert main(["fit", str(tiny_dir), "--memory", "2GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == "portable"
    monkeypatch.setenv("SLMKIT_KERNEL", "sse9")
    assert main(["fit", str(tiny_dir), "--memory", "2GB"]) == 2
    assert "SLMKIT_KERNEL='sse9' is not a kernel variant" in capsys.readouterr().err

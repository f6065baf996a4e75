"""Recipe validation: every bad recipe is rejected before anything runs, naming the stage and the key."""

from __future__ import annotations

import dataclasses

import pytest

from slmkit.cli import main
from slmkit.pipeline import STAGES, RecipeError, packaged_recipe, packaged_recipes, parse_text

OK = """name: t
teacher: {teacher}
stages:
  - stage: gen-data
    n: 8
  - stage: student
  - stage: export
    format: gguf
    type: F16
  - stage: eval
"""


def parse(text: str):
    return parse_text(text, "r.yaml")


def test_valid_recipe_becomes_frozen_dataclasses(tiny_dir):
    r = parse(OK.format(teacher=tiny_dir))
    assert [s.kind for s in r.stages] == ["gen-data", "student", "export", "eval"]
    assert [s.dirname for s in r.stages] == ["01-gen-data", "02-student", "03-export", "04-eval"]
    assert r.stages[0].config.n == 8 and r.stages[2].config.type == "F16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.stages[0].config.n = 9
    assert r.text.startswith("name: t")


@pytest.mark.parametrize(
    "edit, needles",
    [
        (("  - stage: student\n", "  - stage: studnet\n"), ["stage 2 (studnet)", "unknown stage 'studnet'", "did you mean student"]),
        (("    format: gguf\n", ""), ["stage 3 (export)", "missing key 'format'"]),
        (("    n: 8\n", "    n: eight\n"), ["stage 1 (gen-data)", "key 'n' must be int", "'eight'"]),
        (("    n: 8\n", "    n: 8.5\n"), ["stage 1 (gen-data)", "key 'n' must be int"]),
        (("    type: F16\n", "    type: Q9_9\n"), ["stage 3 (export)", "unknown GGUF type", "'Q9_9'"]),
        (("    n: 8\n", "    n: 8\n    max_tokens: 5\n"), ["stage 1 (gen-data)", "unknown key 'max_tokens'", "did you mean max_new_tokens"]),
        (("    n: 8\n", "    n: 1\n"), ["stage 1 (gen-data)", "n must be >= 2"]),
        # a technique's own range check, reported with the stage
        (("  - stage: export\n", "  - stage: prune\n    method: width\n    ratio: 1.5\n  - stage: export\n"),
         ["stage 3 (prune)", "ratio", "(0, 1)"]),
        (("  - stage: export\n", "  - stage: prune\n    method: depth\n  - stage: export\n"),
         ["stage 3 (prune)", "method depth needs key 'keep_layers'"]),
        (("  - stage: eval\n", "  - stage: eval\n    text: /no/such/file.txt\n"), ["stage 4 (eval)", "/no/such/file.txt"]),
        (("name: t\n", "name: t\nteachr: x\n"), ["unknown top-level key 'teachr'", "did you mean teacher"]),
        (("name: t\n", "name: t\nseed: zero\n"), ["top-level key 'seed' must be int"]),
        (("teacher: ", "teacher: /no/such/"), ["top-level key 'teacher'", "no such file or directory"]),
        (("  - stage: student\n", "  - stage: student\n    source: ./missing-dir\n"), ["stage 2 (student)", "missing-dir"]),
        (("  - stage: eval\n", "  - stage: eval\n  - stage: candidates\n    text: generated\n    tasks: [truthfulqa_mc]\n"),
         ["stage 5 (candidates)", "unknown downstream task 'truthfulqa_mc'", "did you mean truthfulqa_mc1"]),
        (("  - stage: eval\n", "  - stage: eval\n  - stage: candidates\n    text: generated\n    tasks: [bbq]\n    task_items: -1\n"),
         ["stage 5 (candidates)", "task items must be >= 0"]),
    ],
)
def test_bad_recipes_name_stage_and_key(tiny_dir, edit, needles):
    text = OK.format(teacher=tiny_dir).replace(*edit)
    with pytest.raises(RecipeError) as exc:
        parse(text)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


@pytest.mark.parametrize(
    "stages, needles",
    [
        # distillation with no student to train
        ("  - stage: gen-data\n  - stage: distill\n", ["stage 2 (distill)", "needs a student model ('model')", "prune"]),
        # export before any student model exists
        ("  - stage: export\n    format: gguf\n  - stage: student\n", ["stage 1 (export)", "needs a student model ('model')", "student"]),
        # evaluation on generated text with no gen-data stage
        ("  - stage: student\n  - stage: eval\n", ["stage 2 (eval)", "teacher-generated data ('data')", "gen-data"]),
    ],
)
def test_impossible_order_is_rejected(tiny_dir, stages, needles):
    with pytest.raises(RecipeError) as exc:
        parse(f"teacher: {tiny_dir}\nstages:\n{stages}")
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_duplicate_stage_names_need_distinct_names(tiny_dir):
    text = OK.format(teacher=tiny_dir) + "  - stage: eval\n"
    with pytest.raises(RecipeError, match=r"stage 5 \(eval\): duplicate stage name"):
        parse(text)
    assert len(parse(text + "    name: eval2\n").stages) == 5


def test_cli_rejects_before_running_anything(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(OK.format(teacher=tiny_dir).replace("    n: 8\n", "    n: [8]\n"))
    out = tmp_path / "run"
    code = main(["build", str(bad), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "stage 1 (gen-data)" in err and "'n'" in err and "Traceback" not in err
    assert not out.exists()  # nothing ran, not even the run directory was made


def test_cli_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\nstages:\n  - stage: [\n")
    assert main(["build", str(bad)]) == 2
    assert "bad.yaml:" in capsys.readouterr().err


def test_packaged_recipes_are_valid_and_use_only_registered_stages():
    found = packaged_recipes()
    assert "default" in found
    for name in found:
        r = packaged_recipe(name)
        assert r.stages and all(s.kind in STAGES for s in r.stages)
    d = packaged_recipe("default")
    assert d.teacher == "default" and d.stages[-1].kind in ("eval", "audit", "speculative")
    with pytest.raises(RecipeError, match="unknown target"):
        packaged_recipe("no-such-target")


def test_compress_stage_options_become_the_method_config():
    """A prune / quantize stage is ``method`` + shared keys + ``options:`` turned into the registered config."""
    from slmkit.compress.prune import SparseGPTConfig
    from slmkit.pipeline.recipe import build_config
    from slmkit.pipeline.stages.compress import PruneConfig, QuantizeConfig

    cfg = build_config(PruneConfig, {"method": "sparsegpt", "sparsity": 0.4, "options": {"blocksize": 64}}, "stage 1 (prune)")
    assert cfg.method_config() == SparseGPTConfig(sparsity=0.4, blocksize=64)
    q = build_config(QuantizeConfig, {"method": "gptq", "options": {"act_order": False}}, "stage 2 (quantize)")
    assert q.method_config().act_order is False and q.method_config().damp == 0.01
    bad = [
        (PruneConfig, {"method": "magnitude", "options": {"blocksize": 64}}, "options key 'blocksize' does not apply"),
        (PruneConfig, {"method": "depth", "options": {"keep_layers": 1}}, "set them as the stage's own keys"),
        (PruneConfig, {"method": "wandaa"}, "did you mean wanda"),
        (QuantizeConfig, {"method": "rtn", "options": {"act_order": True}}, "act_order does not apply to quantizer rtn"),
    ]
    for cls, settings, message in bad:
        with pytest.raises(RecipeError, match=message):
            build_config(cls, settings, "stage 1")


def test_yaml_exponent_floats_are_floats():
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a float field takes it (and --option damp=1e-4), other text is refused."""
    from slmkit.pipeline.recipe import build_config
    from slmkit.pipeline.stages.compress import QuantizeConfig

    q = build_config(QuantizeConfig, {"method": "gptq", "damp": "1e-4"}, "stage 2 (quantize)")
    assert q.method_config().damp == 1e-4
    with pytest.raises(RecipeError, match="damp"):
        build_config(QuantizeConfig, {"method": "gptq", "damp": "small"}, "stage 2 (quantize)")


def test_distill_stage_loss_options_reach_the_loss_config(tiny_dir):
    """beta / alpha (and any new loss knob) reach LossConfig through ``loss_options:``; the key is unchanged without them."""
    from slmkit.pipeline.recipe import build_config
    from slmkit.pipeline.state import stage_key
    from slmkit.pipeline.stages.train import DistillStageConfig

    data = tiny_dir / "config.json"  # any existing file
    cfg = build_config(DistillStageConfig, {"loss": "jsd", "data": str(data), "loss_options": {"beta": 0.9}}, "stage 1")
    assert cfg.distill_config(0).loss.beta == 0.9
    for settings, message in [({"loss_options": {"betta": 0.9}}, "betta: not a setting of the loss"),
                              ({"loss_options": {"temperature": 2.0}}, "temperature: has its own key"),
                              ({"loss": "jsd", "loss_options": {"beta": 1.0}}, "beta must be in")]:
        with pytest.raises(RecipeError, match=message):
            build_config(DistillStageConfig, {"data": str(data), **settings}, "stage 1")

    # an empty options mapping leaves a stage's cache key what it was before the setting existed
    import hashlib
    import json

    from slmkit.artefact import jsonable
    from slmkit.pipeline.state import STAGE_FORMAT
    from slmkit.pipeline.stages.compress import PruneConfig

    recipe = parse(OK.format(teacher=tiny_dir))
    spec = dataclasses.replace(recipe.stages[0], kind="prune", config=PruneConfig(method="wanda", calib="self"))
    old = {k: v for k, v in jsonable(dataclasses.asdict(spec.config)).items() if k != "options"}
    payload = {"format": STAGE_FORMAT, "kind": "prune", "config": old, "recipe": recipe.settings_key(), "input": ""}
    assert stage_key(spec, recipe, "") == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    with_options = dataclasses.replace(spec, config=PruneConfig(method="wanda", calib="self", options={"batch_size": 4}))
    assert stage_key(with_options, recipe, "") != stage_key(spec, recipe, "")


def test_train_audit_speculative_stages_take_any_library_field_through_options(tiny_dir):
    """gen-data, distill, sft, audit and speculative stages set only their own keys; ``options:`` reaches every other field
    of the library config (a new field needs no stage edit), typed and named in errors; the keys stay as they were."""
    text = (f"teacher: {tiny_dir}\nstages:\n  - stage: gen-data\n    n: 8\n    options: {{near_dup: 0.9}}\n  - stage: student\n"
            "  - stage: distill\n    max_steps: 7\n    options: {warmup_steps: 3, lr_scheduler: cosine, data: {prompt_tokens: 8}}\n"
            "  - stage: sft\n    lora: {r: 4, alpha: 8}\n    options: {packing: false, grad_accum: 2}\n"
            "  - stage: audit\n    options: {toxicity_samples: 1}\n"
            "  - stage: speculative\n    options: {k_max: 6, ngram_max: 2}\n")
    stages = parse(text).stages
    assert stages[0].config.synth_config(0).near_dup == 0.9 and stages[0].config.synth_config(0).min_words == 1
    distill, sft, audit, spec = (s.config for s in stages[2:])
    d = distill.distill_config(3)
    assert (d.max_steps, d.warmup_steps, d.lr_scheduler, d.seed) == (7, 3, "cosine", 3)
    assert (d.data.block_size, d.data.prompt_tokens, d.save_total_limit) == (256, 8, 1)
    s = sft.sft_config(0)
    assert (s.lora.r, s.lora.alpha, s.packing, s.grad_accum) == (4, 8.0, False, 2)
    assert audit.audit_config(0).toxicity_samples == 1 and audit.audit_config(0).limit == 16
    sc = spec.spec_config((2,))
    assert (sc.k_max, sc.ngram_max, sc.eos_token_ids, sc.max_new_tokens) == (6, 2, (2,), 48)

    bad = [
        ("distill", "options: {warmup_stepz: 3}", ["stage 3 (distill)", "options: unknown key 'warmup_stepz'", "warmup_steps"]),
        ("distill", "options: {max_steps: 3}", ["options key 'max_steps': set by the stage itself"]),
        ("distill", "options: {data: {block_size: 3}}", ["options key 'data': block_size set by the stage"]),
        ("sft", "lora: {r: 0}", ["stage 3 (sft)", "key 'lora': LoRA rank r must be >= 1"]),
        ("audit", "options: {seed: 1}", ["options key 'seed': set by the stage itself"]),
        ("speculative", "options: {k_max: many}", ["options: key 'k_max' must be int, got str 'many'"]),
    ]
    for kind, line, needles in bad:
        with pytest.raises(RecipeError) as exc:
            parse(f"teacher: {tiny_dir}\nstages:\n  - stage: gen-data\n  - stage: student\n  - stage: {kind}\n    {line}\n")
        for needle in needles:
            assert needle in str(exc.value), (needle, str(exc.value))
    # lora: true / false as before
    plain = parse(f"teacher: {tiny_dir}\nstages:\n  - stage: gen-data\n  - stage: student\n  - stage: sft\n    lora: true\n"
                  "  - stage: sft\n    name: full\n").stages
    assert plain[2].config.sft_config(0).lora.r == 8 and plain[3].config.sft_config(0).lora is None


def test_candidates_maker_and_scorer_are_checked_against_their_registries(monkeypatch):
    """The candidates stage's ``maker`` / ``scorer`` take ``auto`` or any registered name; an error lists the registry."""
    from slmkit.eval.heldout import SCORERS
    from slmkit.pipeline.recipe import build_config
    from slmkit.pipeline.stages.candidates import CandidatesStageConfig

    with pytest.raises(RecipeError, match=r"stage 3 \(candidates\): scorer must be auto or one of llama.cpp, slmkit, got 'zz'"):
        build_config(CandidatesStageConfig, {"scorer": "zz"}, "stage 3 (candidates)")
    monkeypatch.setattr(SCORERS, "_items", dict(SCORERS._items))
    SCORERS.add("zz", object())
    assert build_config(CandidatesStageConfig, {"scorer": "zz"}, "stage 3 (candidates)").compare_config(0).scorer == "zz"


def test_lowrank_stage_options_reach_lowrank_config(tiny_dir):
    """The lowrank stage is ``method`` + shared keys + ``options:`` (any other field of LowRankConfig), like prune."""
    from slmkit.pipeline.recipe import build_config
    from slmkit.pipeline.stages.compress import LowRankStageConfig

    cfg = build_config(LowRankStageConfig, {"ratio": 0.8, "method": "asvd", "options": {"alpha": 1.0}}, "stage 1")
    assert (cfg.method_config().alpha, cfg.method_config().method) == (1.0, "asvd")
    with pytest.raises(RecipeError, match="options: unknown key 'alfa'; LowRankConfig takes"):
        build_config(LowRankStageConfig, {"ratio": 0.8, "options": {"alfa": 1.0}}, "stage 1")


def test_eval_stage_options_reach_perplexity_and_efficiency_configs(tiny_dir):
    """The eval stage sets context / max_tokens / prompt_tokens / new_tokens / seed itself; ``options:`` reaches every
    other field of PerplexityConfig and EfficiencyConfig (add_bos, repeats: fixed by the stage before)."""
    import hashlib
    import json

    from slmkit.artefact import jsonable
    from slmkit.pipeline.state import STAGE_FORMAT, stage_key

    base = f"teacher: {tiny_dir}\nstages:\n  - stage: student\n  - stage: eval\n    text: wikitext\n    context: 32\n"
    plain = parse(base).stages[1]
    m = plain.config.measures(5)
    assert (m.perplexity.context, m.perplexity.stride, m.perplexity.max_tokens, m.perplexity.add_bos) == (32, 32, 2048, False)
    assert (m.efficiency.prompt_tokens, m.efficiency.new_tokens, m.efficiency.repeats, m.efficiency.seed) == (64, 32, 3, 5)
    tuned = parse(base + "    options: {perplexity: {add_bos: true}, efficiency: {repeats: 5}}\n").stages[1]
    m = tuned.config.measures(0)
    assert (m.perplexity.add_bos, m.perplexity.context, m.efficiency.repeats, m.efficiency.new_tokens) == (True, 32, 5, 32)

    bad = [
        ("options: {perplexity: {add_boss: true}}", ["stage 2 (eval)", "unknown key 'add_boss'", "add_bos"]),
        ("options: {perplexity: {context: 64}}", ["options key 'perplexity': context set by the stage itself"]),
        ("options: {efficiency: {seed: 1}}", ["options key 'efficiency': seed set by the stage itself"]),
        ("options: {efficiency: {repeats: 0}}", ["repeats must all be >= 1"]),
        ("options: {repeats: 5}", ["options: unknown key 'repeats'; EvalMeasures takes: perplexity, efficiency"]),
    ]
    for line, needles in bad:
        with pytest.raises(RecipeError) as exc:
            parse(f"{base}    {line}\n")
        for needle in needles:
            assert needle in str(exc.value), (needle, str(exc.value))

    # without options the cache key is what it was before the setting existed; with them it differs
    recipe = parse(base)
    old = {k: v for k, v in jsonable(dataclasses.asdict(plain.config)).items() if k != "options"}
    payload = {"format": STAGE_FORMAT, "kind": "eval", "config": old, "recipe": recipe.settings_key(), "input": ""}
    assert stage_key(plain, recipe, "") == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert stage_key(tuned, recipe, "") != stage_key(plain, recipe, "")

"""Structured output benchmark (issue 22): schema validity and decode speed with and without the constraint.

On the default model (SmolLM2-135M-Instruct), fast path, greedy: N prompts (chat) each asking for a JSON
object of one of a few schemas (nesting, enums, arrays, required fields, bounded numbers), generated
  * free: the schema shown in the prompt only,
  * constrained: the same prompt under the schema (slmkit.runtime.constrain, llguidance token masks),
and reported: share of outputs that parse and validate (jsonschema) in each case, and decode tokens/s of
the constrained runs over the free ones (the same prompts, interleaved, same process: target >= 0.9x).
Speed is measured as generated tokens over decode seconds (time of the first token excluded) on prompts
run one at a time; the close-out and masks are included in the constrained time.

    PYTHONPATH=src python bench/structured.py [--n 200] [--max-new-tokens 128] [--threads 2] [--json out.json]
    PYTHONPATH=src python bench/structured.py --tiny --n 6      (a random tiny model: checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 60}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0}, "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3}},
     "required": ["city", "country", "landmarks"], "additionalProperties": False},
    {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["sentiment", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "director": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 30}, "last": {"type": "string", "maxLength": 30}},
                     "required": ["first", "last"], "additionalProperties": False}},
     "required": ["title", "year", "director"], "additionalProperties": False},
]
SUBJECTS = ["a teacher from Lyon", "Paris", "the sentence 'I loved this film'", "the film Casablanca", "a nurse in Oslo", "Tokyo",
            "the review 'terrible service, never again'", "the film Alien", "a painter from Madrid", "Cairo",
            "the tweet 'the weather is fine today'", "the film Amelie"]
ASKS = ["Describe {s} as a person record", "Give facts about the city {s}", "Classify the sentiment of {s}", "Give a record of {s}"]


def prompts(n: int) -> list[tuple[list[dict], dict]]:
    out = []
    for i in range(n):
        k = i % len(SCHEMAS)
        s = SUBJECTS[(i // len(SCHEMAS) + k) % len(SUBJECTS)]
        text = f"{ASKS[k].format(s=s)}. Answer with only a JSON object matching this JSON schema:\n{json.dumps(SCHEMAS[k])}"
        out.append(([{"role": "user", "content": text}], SCHEMAS[k]))
    return out


def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run_one(fb, chat, schema, constrained: bool, max_new: int) -> tuple[str, int, float]:
    """(text, tokens, decode seconds after the first token) of one greedy completion on the fast path."""
    from slmkit.backends.hf import render_prompt
    from slmkit.runtime.constrain import Constraint
    from slmkit.runtime.decoding import stream

    ids = torch.tensor(fb.tokenizer(render_prompt(fb.tokenizer, chat), add_special_tokens=False).input_ids)
    mask = fb.token_mask(Constraint.json_schema(schema)) if constrained else None
    toks, t1 = [], None
    for step in stream(fb.fm, ids, max_new, mask=mask):
        if t1 is None:
            t1 = time.perf_counter()
        if step.token in fb.fm.eos:
            break
        toks.append(step.token)
    dt = time.perf_counter() - t1 if t1 is not None else 0.0
    return fb.tokenizer.decode(toks, skip_special_tokens=True), len(toks), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--tiny", action="store_true", help="a random tiny llama instead of --model (checks the script, not the numbers)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from slmkit.runtime.backend import FastBackend

    if a.tiny:
        from slmkit.models.tiny import tiny_llama_config, tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model, name = tiny_model(tiny_llama_config(tok, initializer_range=0.2, max_position_embeddings=2048), seed=1), "tiny (random)"
    else:
        from slmkit.models import load

        model, tok = load(a.model)
        name = a.model
    fb = FastBackend(model, tok)
    run_one(fb, *prompts(1)[0], True, 8)  # warm-up: llguidance's tokenizer, first masks
    res = {"free": {"valid": 0, "tokens": 0, "seconds": 0.0}, "constrained": {"valid": 0, "tokens": 0, "seconds": 0.0}}
    for i, (chat, schema) in enumerate(prompts(a.n)):
        order = ("free", "constrained") if i % 2 == 0 else ("constrained", "free")  # interleaved: drift hits both
        for kind in order:
            text, n, dt = run_one(fb, chat, schema, kind == "constrained", a.max_new_tokens)
            r = res[kind]
            r["valid"] += valid(text, schema)
            r["tokens"] += max(n - 1, 0)
            r["seconds"] += dt
    for r in res.values():
        r["valid_share"] = r["valid"] / a.n
        r["decode_tokens_per_s"] = r["tokens"] / r["seconds"] if r["seconds"] > 0 else None
    f, c = res["free"]["decode_tokens_per_s"], res["constrained"]["decode_tokens_per_s"]
    out = {"model": name, "prompts": a.n, "max_new_tokens": a.max_new_tokens, "threads": torch.get_num_threads(),
           "device": platform.processor() or platform.machine(), **res, "speed_ratio": c / f if f and c else None}
    print(f"{name}: {a.n} prompts, greedy, fast path, {torch.get_num_threads()} threads")
    for k in ("free", "constrained"):
        r = res[k]
        print(f"  {k:12s} valid {r['valid']}/{a.n} ({100 * r['valid_share']:.1f}%)  decode {r['decode_tokens_per_s'] or 0:.1f} tok/s")
    print(f"  constrained / free decode speed: {out['speed_ratio'] or 0:.3f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()

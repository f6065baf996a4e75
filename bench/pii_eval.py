"""PII shield measured: per-entity precision and recall on a labelled set built deterministically.

The set (nothing is copied into the repository; it is rebuilt from the shared data on each run):
short business e-mails whose people and addresses are real ones from the Enron corpus
(DecodingTrust's ``privacy_enron_email2name``: an address and the name of its owner), written
into e-mail sentences (greetings, sign-offs, headers, mentions mid-sentence), plus planted
entities of each kind: phone numbers in US/UK/DE/FR national and international formats, payment
cards (Visa, Mastercard, Amex, Discover; valid Luhn check digit, ISO/IEC 7812-1), IBANs (DE, GB,
FR, NL, ES, CH; valid ISO 13616 mod-97 check digits), and distractors that a careless detector
flags: dates, times, amounts, deal/ticket/invoice numbers, zip codes, a 16-digit reference that
fails Luhn, an IBAN-shaped code that fails mod-97.

A second, unplanted check of the pattern kinds on real prose: WikiText-2's test split
(detokenised), which holds dates, years, scores, quantities, ISBNs and no e-mail addresses,
phone, card or IBAN numbers, so every detection of those kinds there is a false positive
(reported per kind, with examples; names there are real and unlabelled, so only counted).

Scoring per kind: a gold span is found (recall) when a detected span of the same kind overlaps
it; a detected span is right (precision) when it overlaps a gold span of its kind; ``exact`` is
the share of gold spans found with exactly their boundaries. Detectors, same interface
``text -> [Span]``, compared in one run:

* ``shield``: slmkit's patterns and cue words (:func:`slmkit.collab.privacy.detect`, no model);
* ``shield+model``: the same plus names listed by the small model (``--model``, default model);
* ``presidio``: Microsoft Presidio's analyzer with spaCy pipeline ``--presidio-model`` (default
  ``en_core_web_sm``), when ``presidio-analyzer``, spaCy and that pipeline load; otherwise reported unavailable.
  Not a dependency of slmkit: ``pip install presidio-analyzer spacy`` plus an English spaCy pipeline
  (spaCy's own are published on GitHub; see docs/benchmarks.md for the one measured).

Usage: PYTHONPATH=src python bench/pii_eval.py [--docs 400] [--seed 0] [--detectors shield,shield+model,presidio]
       [--model default] [--presidio-model en_core_web_sm] [--errors 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

KINDS = ("email", "phone", "card", "iban", "name")


@dataclass
class Doc:
    text: str = ""
    gold: list[tuple[str, int, int]] = field(default_factory=list)  #: (kind, start, end)

    def add(self, s: str, kind: str | None = None) -> None:
        if kind is not None:
            self.gold.append((kind, len(self.text), len(self.text) + len(s)))
        self.text += s


# --------------------------------------------------------------------------- planted values


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):  # the check digit will sit at position 0 from the right
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    brand = rng.choice(["visa", "mc", "amex", "discover"])
    if brand == "amex":
        n = luhn_complete(rng.choice(["34", "37"]), 15, rng)
        groups = [n[:4], n[4:10], n[10:]]
    else:
        n = luhn_complete({"visa": "4", "mc": str(rng.randint(51, 55)), "discover": "6011"}[brand], 16, rng)
        groups = [n[i : i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


IBAN_BBAN = {"DE": "18n", "GB": "4a14n", "FR": "23n", "NL": "4a10n", "ES": "20n", "CH": "17n"}


def iban(rng: random.Random, valid: bool = True) -> str:
    cc = rng.choice(sorted(IBAN_BBAN))
    bban = ""
    for n, t in re.findall(r"(\d+)([an])", IBAN_BBAN[cc]):
        pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if t == "a" else "0123456789"
        bban += "".join(rng.choice(pool) for _ in range(int(n)))
    num = int("".join(str(int(ch, 36)) for ch in bban + cc + "00"))
    check = 98 - num % 97 if valid else (98 - num % 97) % 97 + 1  # +1: off by one, fails mod-97
    s = f"{cc}{check:02d}{bban}"
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4)) if rng.random() < 0.6 else s


def phone(rng: random.Random) -> str:
    d = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    area = str(rng.choice([713, 281, 212, 415, 503, 832, 202]))
    x, y = str(rng.randint(200, 999)), d(4)
    return rng.choice([
        f"({area}) {x}-{y}", f"{area}-{x}-{y}", f"{area}.{x}.{y}", f"+1 {area} {x} {y}", f"+1-{area}-{x}-{y}",
        f"1-800-{x}-{y}", f"{area} {x} {y}", f"+44 20 {d(4)} {d(4)}", f"020 {d(4)} {d(4)}", f"+44 (0)20 {d(4)} {d(4)}",
        f"+49 30 {d(8)}", f"+49 (0)69 {d(4)} {d(4)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}", f"07{d(3)} {d(6)}",
    ])


def distractor(rng: random.Random) -> str:
    d = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    bad_card = luhn_complete("4", 16, rng)
    bad_card = bad_card[:-1] + str((int(bad_card[-1]) + 1) % 10)  # fails Luhn
    return rng.choice([
        f"The meeting moved to {rng.randint(2000, 2002)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} at {rng.randint(8, 17)}:{rng.choice(['00', '30'])}.",
        f"Deal {d(6)} settles at ${rng.randint(1, 999)},{d(3)},{d(3)}.{d(2)} on May {rng.randint(1, 31)}, 2001.",
        f"Please reference ticket {d(8)} in your reply.",
        f"Invoice {rng.randint(2000, 2002)}-{d(4)} covers {rng.randint(1, 99)},{d(3)} MMBtu/d for Q{rng.randint(1, 4)} 2001.",
        f"Ship to zip {d(5)}, building {rng.randint(1, 60)}, floor {rng.randint(1, 50)}.",
        f"Volumes were {rng.randint(10, 99)}.{d(1)}% higher than the {d(3)} {d(3)} MWh forecast.",
        f"Reference number {' '.join(bad_card[i:i + 4] for i in range(0, 16, 4))} was rejected.",
        f"Our internal code is {iban(rng, valid=False)} (not an account).",
        f"Version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 20)} of the model runs {d(2)}-{d(2)} scenarios.",
        f"Contract No. {d(8)} runs from 01/{rng.randint(10, 28)}/2001 to 12/31/2002.",
    ])


# --------------------------------------------------------------------------- documents


def real_people(path: str) -> list[tuple[str, str]]:
    """(name, address) of Enron correspondents whose name is a capitalised first and last name."""
    from slmkit.data import read_jsonl

    out = []
    for r in read_jsonl(path):
        name = str(r["name"]).strip()
        if re.fullmatch(r"[A-Z][a-z]+(?: [A-Z]\.)?(?: [A-Z][a-z]+(?:-[A-Z][a-z]+)?){1,2}", name):
            out.append((name, str(r["email"]).strip()))
    return out


def build_doc(rng: random.Random, people: list[tuple[str, str]]) -> Doc:
    (to_name, to_mail), (me, my_mail), (third, third_mail) = rng.sample(people, 3)
    first = to_name.split()[0]
    doc = Doc()
    # a header half of the time
    if rng.random() < 0.5:
        doc.add("From: "); doc.add(me, "name"); doc.add(" <"); doc.add(my_mail, "email"); doc.add(">\nTo: ")
        doc.add(to_mail, "email"); doc.add("\nSubject: " + rng.choice(["Re: gas deal", "call tomorrow", "payment details", "FW: contract"]) + "\n\n")
    greet = rng.choice(["Dear ", "Hi ", "Hello ", "", "Good morning "])
    if greet:
        doc.add(greet); doc.add(rng.choice([to_name, first]), "name"); doc.add(",\n\n")
    body = [
        lambda: (doc.add("I spoke with "), doc.add(third, "name"), doc.add(" about the contract and we agreed on the terms. ")),
        lambda: (doc.add("Please forward this to "), doc.add(third, "name"), doc.add(" before Friday. ")),
        lambda: (doc.add("According to "), doc.add(third, "name"), doc.add(", the volumes are final. ")),
        lambda: (doc.add(third, "name"), doc.add(rng.choice([" will join the call. ", " approved the change yesterday. ", " is out of the office until Monday. "]))),
        lambda: (doc.add("You can reach me at "), doc.add(phone(rng), "phone"), doc.add(rng.choice([". ", " or on my cell. ", " after 3 pm. "]))),
        lambda: (doc.add("My direct line is "), doc.add(phone(rng), "phone"), doc.add(". ")),
        lambda: (doc.add("Call "), doc.add(third.split()[0], "name"), doc.add(" on "), doc.add(phone(rng), "phone"), doc.add(". ")),
        lambda: (doc.add("The card on file is "), doc.add(card(rng), "card"), doc.add(rng.choice([", expiring 04/03. ", ". "]))),
        lambda: (doc.add("Charge the fee to my card "), doc.add(card(rng), "card"), doc.add(" please. ")),
        lambda: (doc.add("Wire the payment to IBAN "), doc.add(iban(rng), "iban"), doc.add(". ")),
        lambda: (doc.add("Our account is "), doc.add(iban(rng), "iban"), doc.add(rng.choice([" (Deutsche Bank). ", ". "]))),
        lambda: (doc.add("Send the signed copy to "), doc.add(third_mail, "email"), doc.add(". ")),
        lambda: (doc.add("cc: "), doc.add(third, "name"), doc.add(" ("), doc.add(third_mail, "email"), doc.add(")\n")),
        lambda: doc.add(distractor(rng) + " "),
        lambda: doc.add(distractor(rng) + " "),
        lambda: doc.add(rng.choice(["The pipeline capacity report is attached. ", "Let me know if you have questions. ",
                                    "The board meets next week in Houston. ", "Prices at Henry Hub rose again today. "])),
    ]
    for f in rng.sample(body, rng.randint(3, 6)):
        f()
    doc.add("\n\n" + rng.choice(["Thanks,\n", "Regards,\n", "Best,\n", "Sincerely,\n", "-- \n", ""]))
    doc.add(rng.choice([me, me.split()[0]]), "name")
    if rng.random() < 0.3:
        doc.add("\n"); doc.add(phone(rng), "phone")
    return doc


def check(doc: Doc) -> None:
    """Planted values are what they claim: spans in place, cards pass Luhn, IBANs pass mod-97."""
    from slmkit.collab.privacy import iban_ok, luhn_ok

    for kind, s, e in doc.gold:
        v = doc.text[s:e]
        assert v.strip() == v and v, (kind, v)
        if kind == "card":
            assert luhn_ok(re.sub(r"\D", "", v)), v
        if kind == "iban":
            assert iban_ok(v), v


def build_set(n: int, seed: int) -> list[Doc]:
    from slmkit.data import data_file

    people = real_people(str(data_file("decodingtrust/privacy_enron_email2name.jsonl.gz")))
    rng = random.Random(seed)
    docs = [build_doc(rng, people) for _ in range(n)]
    for d in docs:
        check(d)
    return docs


# --------------------------------------------------------------------------- detectors and scoring


def shield_detector(small=None):
    from slmkit.collab.privacy import ShieldConfig, detect

    cfg = ShieldConfig(model_names=small is not None)
    return lambda text: [(s.kind, s.start, s.end) for s in detect(text, cfg, small)]


PRESIDIO_KINDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "card", "IBAN_CODE": "iban",
                  "PERSON": "name", "IP_ADDRESS": "ip"}  #: Presidio's entity types -> the shield's kinds


def presidio_detector(model: str):
    """Presidio's AnalyzerEngine on spaCy pipeline ``model`` (Presidio's own default is en_core_web_lg), asked for
    the entity types that match the shield's kinds (:data:`PRESIDIO_KINDS`); its other settings are its defaults.

    A model that is not installed raises OSError (reported as unavailable) before Presidio would try to download it.
    """
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    if not (spacy.util.is_package(model) or os.path.isdir(model)):
        raise OSError(f"--presidio-model {model!r}: no such spaCy pipeline installed (a package name or a model folder)")
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy",
                                               "models": [{"lang_code": "en", "model_name": model}]}).create_engine()
    engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    entities = sorted(PRESIDIO_KINDS)
    return lambda text: [(PRESIDIO_KINDS[r.entity_type], r.start, r.end)
                         for r in engine.analyze(text, language="en", entities=entities)]


def score(docs: list[Doc], predict) -> dict:
    kinds = sorted({k for d in docs for k, _, _ in d.gold})
    tally = {k: {"gold": 0, "found": 0, "exact": 0, "pred": 0, "right": 0} for k in kinds}
    misses, false = [], []
    for d in docs:
        pred = predict(d.text)
        ov = lambda a, b: a[1] < b[2] and b[1] < a[2]  # noqa: E731
        for g in d.gold:
            t = tally[g[0]]
            t["gold"] += 1
            hit = [p for p in pred if p[0] == g[0] and ov(p, g)]
            t["found"] += bool(hit)
            t["exact"] += any(p[1:] == g[1:] for p in hit)
            if not hit:
                misses.append((g[0], d.text[g[1]:g[2]], d.text[max(0, g[1] - 30):g[2] + 30]))
        for p in pred:
            t = tally.setdefault(p[0], {"gold": 0, "found": 0, "exact": 0, "pred": 0, "right": 0})
            t["pred"] += 1
            ok = any(g[0] == p[0] and ov(p, g) for g in d.gold)
            t["right"] += ok
            if not ok:
                false.append((p[0], d.text[p[1]:p[2]], d.text[max(0, p[1] - 30):p[2] + 30]))
    out = {}
    for k, t in tally.items():
        out[k] = {"gold": t["gold"], "detected": t["pred"],
                  "recall": t["found"] / t["gold"] if t["gold"] else None,
                  "precision": t["right"] / t["pred"] if t["pred"] else None,
                  "exact": t["exact"] / t["gold"] if t["gold"] else None}
    return {"per_kind": out, "misses": misses, "false_positives": false}


def wikitext_paragraphs(limit_chars: int) -> list[str]:
    """WikiText-2 test paragraphs, detokenised (`` @,@ `` -> ``,``), up to ``limit_chars`` characters."""
    from slmkit.data import data_file

    out, total = [], 0
    for line in open(data_file("wikitext-2/test.txt"), encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line)
        out.append(line)
        total += len(line)
        if total >= limit_chars:
            break
    return out


def negatives(predict, paragraphs: list[str], show: int) -> dict:
    counts: dict[str, int] = {}
    shown = 0
    for p in paragraphs:
        for kind, s, e in predict(p):
            counts[kind] = counts.get(kind, 0) + 1
            if kind != "name" and shown < show:
                print(f"    false positive on WikiText [{kind}] {p[s:e]!r} in {p[max(0, s - 30):e + 30]!r}")
                shown += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detectors", default="shield,presidio")
    ap.add_argument("--model", default="default", help="small model for shield+model's names")
    ap.add_argument("--presidio-model", default="en_core_web_sm", help="spaCy pipeline (package name or folder) for presidio")
    ap.add_argument("--errors", type=int, default=10, help="print this many misses and false positives per detector")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wikitext-chars", type=int, default=300_000, help="unplanted real prose for false positives (0: skip)")
    args = ap.parse_args()
    docs = build_set(args.docs, args.seed)
    counts = {k: sum(g[0] == k for d in docs for g in d.gold) for k in KINDS}
    print(json.dumps({"docs": len(docs), "chars": sum(len(d.text) for d in docs), "gold": counts, "args": vars(args)}), flush=True)
    results = {}
    for name in args.detectors.split(","):
        try:
            if name == "shield":
                predict = shield_detector()
            elif name == "shield+model":
                import torch

                from slmkit.backends import HFBackend

                torch.set_num_threads(args.threads)
                predict = shield_detector(HFBackend.from_spec(args.model))
            elif name == "presidio":
                predict = presidio_detector(args.presidio_model)
            else:
                raise SystemExit(f"unknown detector {name!r}; known: shield, shield+model, presidio")
        except ImportError as err:
            results[name] = {"unavailable": f"{type(err).__name__}: {err}"}
            print(json.dumps({name: results[name]}), flush=True)
            continue
        except OSError as err:  # presidio without a spaCy model
            results[name] = {"unavailable": f"{type(err).__name__}: {err}".splitlines()[0]}
            print(json.dumps({name: results[name]}), flush=True)
            continue
        t0 = time.perf_counter()
        rep = score(docs, predict)
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        if args.wikitext_chars and name != "shield+model":
            paras = wikitext_paragraphs(args.wikitext_chars)
            rep["wikitext"] = {"chars": sum(map(len, paras)), "detections": negatives(predict, paras, args.errors)}
        for what in ("misses", "false_positives"):
            for kind, value, ctx in rep[what][: args.errors]:
                print(f"  {name} {what[:-2] if what == 'misses' else 'false positive'} [{kind}] {value!r} in {ctx!r}")
            rep[what] = len(rep[what])
        results[name] = rep
        print(json.dumps({name: rep}), flush=True)
    print(f"\n## PII detection: {len(docs)} e-mails, gold spans {counts}")
    print(f"{'detector':<14}{'kind':<9}{'gold':>6}{'recall':>8}{'precision':>10}{'exact':>7}")
    for name, rep in results.items():
        if "unavailable" in rep:
            print(f"{name:<14}unavailable: {rep['unavailable']}")
            continue
        for k, r in rep["per_kind"].items():
            f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{name:<14}{k:<9}{r['gold']:>6}{f(r['recall']):>8}{f(r['precision']):>10}{f(r['exact']):>7}")
        if "wikitext" in rep:
            w = rep["wikitext"]
            print(f"{name:<14}WikiText-2 ({w['chars']} chars, unplanted): detections {w['detections']} "
                  "(every email/phone/card/iban there is a false positive; names are real, unlabelled)")
    print(json.dumps({"pii": results}), flush=True)


if __name__ == "__main__":
    main()

"""Privacy shield: detectors, and the outgoing requests captured at a real local HTTP endpoint."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from slmkit.backends import Completion, GenParams, OpenAIBackend
from slmkit.collab.privacy import ShieldConfig, ShieldedBackend, detect, iban_ok, luhn_ok, redact, restore
from slmkit.errors import ConfigError

PLANTED = {
    "name": "Alice Johnson",
    "doctor": "Robert Lang",
    "email": "alice.j@example.com",
    "phone": "+44 20 7946 0958",
    "phone2": "(555) 123-4567",
    "card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "address": "42 Baker Street",
}
TEXT = (
    f"Hello, my name is {PLANTED['name']} and I live at {PLANTED['address']}, London. "
    f"Email me at {PLANTED['email']} or call {PLANTED['phone']} or {PLANTED['phone2']}. "
    f"My card is {PLANTED['card']}, IBAN {PLANTED['iban']}. Dr. {PLANTED['doctor']} saw me last week. "
    "Please write a short reply to me that repeats my e-mail address."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def capture_server():
    """A real OpenAI-style endpoint on 127.0.0.1 that records every request body it receives
    and answers by echoing back the placeholders it was sent."""
    seen: list[bytes] = []
    app = FastAPI()

    def _reply(text: str) -> str:
        tags = re.findall(r"\[[A-Z]+_\d+\]", text)
        return "Dear " + " ".join(tags) + " - noted."

    @app.get("/v1/models")
    async def models(request: Request):
        seen.append(b"GET /v1/models " + json.dumps(dict(request.headers)).encode())
        return {"object": "list", "data": [{"id": "capture", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        seen.append(raw)
        body = json.loads(raw)
        text = " ".join(m["content"] for m in body["messages"])
        return {"choices": [{"message": {"role": "assistant", "content": _reply(text)}, "finish_reason": "stop"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        seen.append(raw)
        return {"choices": [{"text": _reply(json.loads(raw)["prompt"]), "finish_reason": "stop"}]}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    seen.clear()
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    th.join(timeout=5)


def _leaks(raw: bytes) -> list[str]:
    text = raw.decode("utf-8")
    text_json = json.loads(text) if text.startswith("{") else text
    flat = json.dumps(text_json, ensure_ascii=False)
    digits = re.sub(r"\D", "", flat)
    leaks = [k for k, v in PLANTED.items() if v in flat or v.lower() in flat.lower()]
    for k in ("card", "phone"):
        if re.sub(r"\D", "", PLANTED[k]) in digits:
            leaks.append(k + " digits")
    for part in ("Alice", "Johnson", "Lang", "Baker"):
        if part in flat:
            leaks.append(part)
    return leaks


def test_outgoing_requests_carry_no_planted_pii(capture_server):
    url, seen = capture_server
    remote = OpenAIBackend(url, retries=0)
    shield = ShieldedBackend(remote)
    seen.clear()
    chat = shield.generate([[{"role": "user", "content": TEXT}]], GenParams(max_new_tokens=20))[0]
    raw = shield.generate([TEXT], GenParams(max_new_tokens=20))[0]
    assert len(seen) == 2
    for body in seen:
        assert _leaks(body) == []
        assert b"[EMAIL_1]" in body and b"[CARD_1]" in body and b"[NAME_1]" in body
    # the reply's placeholders are restored on the device
    for c in (chat, raw):
        assert PLANTED["name"] in c.text and PLANTED["email"] in c.text and PLANTED["card"] in c.text
        assert "[" not in c.text
        assert c.meta["redacted"]["card"] == 1 and c.meta["redacted"]["phone"] == 2
    # without the shield the same request does leak (the capture really sees the body)
    seen.clear()
    remote.generate([TEXT], GenParams(max_new_tokens=5))
    assert "email" in _leaks(seen[0]) and "card" in _leaks(seen[0])


class _NameLister:
    """A stand-in small model whose answer lists one real and one invented name."""

    name = "lister"
    tokenizer = None

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        return [Completion("1. Zed Quorra\n2. Invented Person\n3. Mira Tolk\n- lowercase name", 5, "stop") for _ in prompts]

    def score(self, texts, contexts=None):
        raise AssertionError("not used")


def test_model_names_are_kept_only_if_verbatim():
    text = "Zed Quorra paid the bill; Quorra was happy."
    spans = detect(text, ShieldConfig(), small=_NameLister())
    assert [s.text for s in spans if s.kind == "name"] == ["Zed Quorra", "Quorra"]
    assert "Invented" not in redact(text, small=_NameLister())[0]
    assert "Quorra" not in redact(text, small=_NameLister())[0]


def test_shield_asks_the_small_model_once_for_all_prompts():
    from slmkit.collab.privacy import shielded_generate

    class Echo:
        name = "remote"
        sent: list = []

        def generate(self, prompts, params):
            self.sent.extend(prompts)
            return [Completion("ok", 1, "stop") for _ in prompts]

    small, remote = _NameLister(), Echo()
    prompts = ["Zed Quorra paid.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mira Tolk called Zed Quorra."}],
               "Nothing personal here."]
    shielded_generate(remote, prompts, GenParams(), ShieldConfig(), small)
    assert small.calls == 1  # every message of every prompt in one batch
    flat = " ".join(p if isinstance(p, str) else " ".join(m["content"] for m in p) for p in remote.sent)
    assert "Quorra" not in flat and "Mira" not in flat and "Tolk" not in flat and "Nothing personal here." in flat


def test_detectors():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    # a Luhn-invalid 16-digit number is not a card; dates and plain numbers are not phones
    kinds = {s.kind for s in detect("order 1234 5678 9012 3456 on 12 March 2023, 250 items")}
    assert "card" not in kinds and "phone" not in kinds
    text, red = redact("mail bob@x.org and bob@x.org, then eve@y.net")
    assert text == "mail [EMAIL_1] and [EMAIL_1], then [EMAIL_2]"
    assert restore("to EMAIL_2 and [EMAIL_1]", red) == "to eve@y.net and bob@x.org"
    with pytest.raises(ConfigError):
        ShieldConfig(kinds=("email", "dna"))


def _found(text, kind):
    return [s.text for s in detect(text, ShieldConfig(model_names=False)) if s.kind == kind]


def test_phones_not_dates_or_invoice_numbers():
    from slmkit.collab.privacy import phone_ok

    assert _found("Call Ann on +33 1 42 68 53 00 or 1-800-779-5398.", "phone") == ["+33 1 42 68 53 00", "1-800-779-5398"]
    assert _found("Meeting on 2001-08-04; invoice 2002-1025 covers Q4; dated 12.03.2001.", "phone") == []
    assert phone_ok("853-1234", "call me at ") and not phone_ok("853-1234", "order ")  # a short local number needs a cue
    assert phone_ok("07878 900754") and phone_ok("(713) 853-1234")


def test_digits_inside_an_iban_shaped_code_are_not_a_card_or_phone():
    valid = "DE97 6216 5837 0113 8118 19"
    assert iban_ok(valid) and luhn_ok("621658370113811819")  # the account's digits also pass Luhn
    spans = detect(f"Wire it to IBAN {valid}. Thanks", ShieldConfig(model_names=False))
    assert [(s.kind, s.text) for s in spans] == [("iban", valid)]
    bad = "GB31 GQWM 6640 4915 8046 23"  # IBAN-shaped, wrong checksum: nothing
    assert not iban_ok(bad) and detect(f"Our internal code is {bad} (not an account).", ShieldConfig(model_names=False)) == []


def test_gazetteer_names_and_what_it_refuses():
    pytest.importorskip("faker")
    from slmkit.collab.pii_names import lexicon_names

    assert lexicon_names("I spoke with Connie Wester about it. Call Connie on Monday.") == ["Connie Wester", "Connie"]
    assert lexicon_names("Colonel John G. Hill outlined the plan.") == ["John G. Hill"]
    # places, organisations, months and everyday words that are also given names
    assert lexicon_names("Prices at Henry Hub rose. May I ask? Will you come? The board meets in Houston.") == []
    assert lexicon_names("They flew to St. Lucie and Madison Square Garden with Deutsche Bank.") == []
    text = "Please forward this to Amy Ashburn before Friday.\n\n-- \nPat"
    assert _found(text, "name") == ["Amy Ashburn", "Pat"]
    assert [s.text for s in detect(text, ShieldConfig(model_names=False, lexicon_names=False)) if s.kind == "name"] == ["Pat"]

"""Function-calling accuracy on a held-out set of calls (issue 22).

The set is generated in code, deterministically from a seed: ten functions (weather, currency,
timers, e-mail, ...) given as OpenAI tool specs (:data:`TOOLS`), and templated user requests whose
gold call is known. Train and test are disjoint twice over: each function's request templates are
split (the test phrasings never appear in training) and so are the free values (cities, names,
amounts, texts; enum values are shared, since a function's schema fixes them). The scoring follows
the AST-match idea of the Berkeley Function-Calling Leaderboard (Yan et al. 2024): a prediction is
parsed, not string-compared.

Per request: the reply is parsed with the server's parser (:func:`slmkit.runtime.tools.parse_reply`)
and its first call is compared with the gold one: ``function`` (the right name), ``exact`` (right name
and arguments equal after JSON normalisation: keys unordered, ``5`` == ``5.0``, nothing missing or
extra), per-argument matches (each gold argument present with an equal value), and ``valid`` (a call to
an offered function whose arguments match its schema). :func:`evaluate` runs a local model free
(the tools in the prompt only) or constrained (``tool_choice`` ``required``: the call grammar).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

from slmkit.backends.base import Backend, GenParams
from slmkit.errors import ConfigError


def _fn(name: str, description: str, props: dict, required: list[str] | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}}}


_S = {"type": "string", "minLength": 1, "maxLength": 60}
UNITS = ["celsius", "fahrenheit"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR"]
LANGS = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
#: the functions offered with every request
TOOLS = [
    _fn("get_weather", "Current weather of a city", {"city": {**_S, "description": "city name"},
                                                     "unit": {"enum": UNITS}}),
    _fn("convert_currency", "Convert an amount of money", {"amount": {"type": "number", "minimum": 0, "maximum": 1e9},
                                                          "from_currency": {"enum": CURRENCIES},
                                                          "to_currency": {"enum": CURRENCIES}}),
    _fn("set_timer", "Start a countdown timer", {"minutes": {"type": "integer", "minimum": 1, "maximum": 600}}),
    _fn("send_email", "Send an e-mail", {"to": {**_S, "description": "address"}, "subject": _S}),
    _fn("search_web", "Search the web", {"query": {**_S, "maxLength": 80}}),
    _fn("play_music", "Play songs by an artist", {"artist": _S, "shuffle": {"type": "boolean"}}),
    _fn("translate_text", "Translate a text", {"text": {**_S, "maxLength": 80}, "target_language": {"enum": LANGS}}),
    _fn("get_stock_price", "Latest price of a stock", {"symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}}),
    _fn("book_taxi", "Book a taxi", {"pickup": _S, "destination": _S}),
    _fn("calculate_tip", "Tip for a restaurant bill", {"bill": {"type": "number", "minimum": 0, "maximum": 100000},
                                                      "percent": {"type": "integer", "minimum": 0, "maximum": 100}}),
]

# free values: even positions train, odd positions test (disjoint)
_VALUES = {
    "city": ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Dublin", "Quito", "Perth", "Seville",
             "Toronto", "Nairobi", "Krakow", "Manila"],
    "amount": [12.5, 40, 250, 99.99, 7, 1200, 65, 310.25, 18, 5000, 42, 880],
    "minutes": [3, 5, 10, 12, 15, 20, 25, 30, 45, 50, 60, 90],
    "email": ["ana@example.com", "bo.li@example.org", "chen@example.net", "dara@example.com", "eli@example.org",
              "farah@example.net", "gus@example.com", "hana@example.org"],
    "subject": ["Lunch on Friday", "Quarterly report", "Flight details", "Birthday party", "Invoice 2231",
                "Team offsite", "Password reset", "Garden plans"],
    "query": ["best hiking boots", "how tall is Mount Kenya", "vegan lasagna recipe", "train times Rome to Milan",
              "who invented the telephone", "cheap flights to Seoul", "symptoms of dehydration", "history of jazz"],
    "artist": ["Miles Davis", "Adele", "Fela Kuti", "Bjork", "Nina Simone", "Radiohead", "Shakira", "Daft Punk"],
    "text": ["Good morning", "Where is the station?", "Thank you very much", "I would like a coffee",
             "See you tomorrow", "The museum is closed", "How much is this?", "Happy birthday"],
    "symbol": ["AAPL", "MSFT", "TSLA", "NVDA", "AMZN", "IBM", "ORCL", "SAP"],
    "place": ["the airport", "Central Station", "the Grand Hotel", "12 Oak Street", "the city museum", "Pier 39",
              "the university", "the stadium", "Union Square", "the harbour"],
    "bill": [48, 120.5, 76.4, 230, 35.75, 64, 310, 89.9],
    "percent": [10, 15, 18, 20, 12, 25],
}
# per function: request templates; the first TRAIN_TEMPLATES train, the rest are held out
_TEMPLATES = {
    "get_weather": ["What's the weather in {city} in {unit}?",
                    "Tell me the current weather for {city}, degrees {unit}.",
                    "Is it cold in {city} right now? Answer in {unit}.",
                    "How warm is it in {city}? Use {unit}.",
                    "Give me {city}'s weather in {unit} please."],
    "convert_currency": ["Convert {amount} {from_currency} to {to_currency}.",
                         "How much is {amount} {from_currency} in {to_currency}?",
                         "I have {amount} {from_currency}; what is that in {to_currency}?",
                         "Change {amount} {from_currency} into {to_currency} for me.",
                         "What do {amount} {from_currency} come to in {to_currency}?"],
    "set_timer": ["Set a timer for {minutes} minutes.", "Start a {minutes} minute countdown.",
                  "Remind me in {minutes} minutes with a timer.", "Timer: {minutes} minutes, please.",
                  "Count down {minutes} minutes for the pasta."],
    "send_email": ["Email {to} with the subject \"{subject}\".", "Send a mail to {to} titled \"{subject}\".",
                   "Write to {to}, subject line \"{subject}\".", "Drop {to} an email about \"{subject}\".",
                   "Compose an email for {to} with subject \"{subject}\"."],
    "search_web": ["Search the web for {query}.", "Look up {query} online.", "Google {query}.",
                   "Find results about {query} on the internet.", "Can you search for {query}?"],
    "play_music": ["Play {artist}{shuffle_text}.", "Put on some {artist}{shuffle_text}.",
                   "I want to hear {artist}{shuffle_text}.", "Start music by {artist}{shuffle_text}.",
                   "Queue up {artist}{shuffle_text}."],
    "translate_text": ["Translate \"{text}\" into {target_language}.", "How do you say \"{text}\" in {target_language}?",
                       "Put \"{text}\" in {target_language}.", "What is \"{text}\" in {target_language}?",
                       "Render \"{text}\" in {target_language}, please."],
    "get_stock_price": ["What's the stock price of {symbol}?", "How is {symbol} trading?",
                        "Get me the latest quote for {symbol}.", "Check the share price of {symbol}.",
                        "Price of {symbol} stock now?"],
    "book_taxi": ["Book a taxi from {pickup} to {destination}.", "I need a cab from {pickup} to {destination}.",
                  "Get me a ride from {pickup} to {destination}.", "Call a taxi: {pickup} to {destination}.",
                  "Order a car from {pickup} going to {destination}."],
    "calculate_tip": ["What's a {percent}% tip on {bill}?", "Calculate a {percent} percent tip for a bill of {bill}.",
                      "The bill is {bill}; how much is {percent}% tip?", "Tip {percent}% on {bill}, how much?",
                      "How much should I tip at {percent}% if the bill is {bill}?"],
}
TRAIN_TEMPLATES = 3  #: templates per function used for training; the rest are held out
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ToolExample:
    id: str
    request: str  #: the user's message
    name: str  #: gold function
    arguments: dict  #: gold arguments
    tools: tuple[str, ...] = ()  #: names of the functions offered with the request, in prompt order (empty: all)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.request}]

    def offered(self, tools: list[dict] = TOOLS) -> list[dict]:
        """The tool specs offered with this request."""
        if not self.tools:
            return list(tools)
        by_name = {t["function"]["name"]: t for t in tools}
        return [by_name[n] for n in self.tools]


def _draw(pool: str, split: str, rng: random.Random):
    vals = _VALUES[pool][SPLITS.index(split)::2]
    return rng.choice(vals)


def _example(name: str, template: str, split: str, rng: random.Random, idx: int, offered: int) -> ToolExample:
    args: dict = {}
    fill: dict = {}
    if name == "get_weather":
        args = {"city": _draw("city", split, rng), "unit": rng.choice(UNITS)}
    elif name == "convert_currency":
        src, dst = rng.sample(CURRENCIES, 2)
        args = {"amount": _draw("amount", split, rng), "from_currency": src, "to_currency": dst}
    elif name == "set_timer":
        args = {"minutes": _draw("minutes", split, rng)}
    elif name == "send_email":
        args = {"to": _draw("email", split, rng), "subject": _draw("subject", split, rng)}
    elif name == "search_web":
        args = {"query": _draw("query", split, rng)}
    elif name == "play_music":
        args = {"artist": _draw("artist", split, rng), "shuffle": rng.random() < 0.5}
        fill = {"shuffle_text": " on shuffle" if args["shuffle"] else " in order"}
    elif name == "translate_text":
        args = {"text": _draw("text", split, rng), "target_language": rng.choice(LANGS)}
    elif name == "get_stock_price":
        args = {"symbol": _draw("symbol", split, rng)}
    elif name == "book_taxi":
        pickup, dest = _draw("place", split, rng), _draw("place", split, rng)
        while dest == pickup:
            dest = _draw("place", split, rng)
        args = {"pickup": pickup, "destination": dest}
    elif name == "calculate_tip":
        args = {"bill": _draw("bill", split, rng), "percent": _draw("percent", split, rng)}
    request = template.format(**args, **fill)
    names = [t["function"]["name"] for t in TOOLS]
    tools: tuple[str, ...] = ()
    if 0 < offered < len(names):  # the gold function and offered - 1 others, in random order
        picked = [name, *rng.sample([x for x in names if x != name], offered - 1)]
        rng.shuffle(picked)
        tools = tuple(picked)
    return ToolExample(f"{split}-{idx}", request, name, args, tools)


def make_split(split: str, n: int, seed: int = 0, offered: int = 4) -> list[ToolExample]:
    """``n`` requests of ``split`` ("train" or "test"), the functions in turn, from templates and values of that
    split only; each offers ``offered`` functions (the gold one among random others; 0 = all ten)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be train or test, got {split!r}")
    if n < 1 or offered < 0:
        raise ConfigError(f"n must be >= 1 and offered >= 0, got {n}, {offered}")
    rng = random.Random(f"{seed}/{split}")
    names = [t["function"]["name"] for t in TOOLS]
    out = []
    for i in range(n):
        name = names[i % len(names)]
        temps = _TEMPLATES[name][:TRAIN_TEMPLATES] if split == "train" else _TEMPLATES[name][TRAIN_TEMPLATES:]
        out.append(_example(name, rng.choice(temps), split, rng, i, offered))
    return out


def sft_rows(examples: list[ToolExample], tools: list[dict] = TOOLS) -> list[dict]:
    """The examples with their gold calls as tool-use rows (the format ``slmkit sft`` reads, as ``gen-data --tools`` writes)."""
    return [{"id": ex.id, "tools": ex.offered(tools), "messages": [*ex.messages(), {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{ex.id}", "type": "function", "function": {"name": ex.name, "arguments": json.dumps(ex.arguments)}}]}]}
        for ex in examples]


# --------------------------------------------------------------------------- scoring


def normalise(v):
    """A JSON value compared by meaning: integral floats as ints, objects with sorted keys."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: normalise(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [normalise(x) for x in v]
    return v


@dataclass
class CallScore:
    valid: bool  #: a call to an offered function, arguments valid against its schema
    function: bool  #: the right function
    exact: bool  #: right function and arguments equal after normalisation
    args_right: int  #: gold arguments present with an equal value (0 if the function is wrong)
    args_total: int  #: gold arguments
    predicted: dict | None = None  #: {"name", "arguments"} of the first call (arguments parsed), None if there is none


def score_reply(reply: str, gold: ToolExample, tools: list[dict] = TOOLS) -> CallScore:
    """Score one generated reply against the gold call (first call of the reply; none: all wrong).
    ``valid`` needs a function the request offered (``gold.offered(tools)``)."""
    import jsonschema

    from slmkit.runtime.tools import parse_reply

    calls = parse_reply(reply).get("tool_calls") or []
    n = len(gold.arguments)
    if not calls:
        return CallScore(False, False, False, 0, n)
    name = calls[0]["function"]["name"]
    try:
        args = json.loads(calls[0]["function"]["arguments"])
    except ValueError:
        return CallScore(False, name == gold.name, False, 0, n, {"name": name, "arguments": None})
    params = {t["function"]["name"]: t["function"]["parameters"] for t in gold.offered(tools)}
    valid = name in params and jsonschema.Draft202012Validator(params[name]).is_valid(args)
    pred = {"name": name, "arguments": args}
    if name != gold.name or not isinstance(args, dict):
        return CallScore(valid, name == gold.name, False, 0, n, pred)
    right = sum(k in args and normalise(args[k]) == normalise(v) for k, v in gold.arguments.items())
    return CallScore(valid, True, normalise(args) == normalise(gold.arguments), right, n, pred)


@dataclass
class ToolEvalResult:
    examples: int
    constrained: bool
    valid: float  #: share of replies holding a valid call
    function_accuracy: float
    exact_accuracy: float  #: right function and arguments
    exact_ci95: tuple[float, float]  #: Wilson interval of exact_accuracy
    argument_accuracy: float  #: gold arguments right, over all gold arguments
    per_function: dict[str, float] = field(default_factory=dict)  #: exact accuracy per gold function
    samples: list[dict] = field(default_factory=list)  #: the first few requests with reply and score

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate(scores: list[CallScore], examples: list[ToolExample], constrained: bool, replies: list[str] | None = None,
              keep: int = 5) -> ToolEvalResult:
    from slmkit.trust.stats import wilson

    n = len(scores)
    exact = sum(s.exact for s in scores)
    per: dict[str, list[bool]] = {}
    for s, ex in zip(scores, examples):
        per.setdefault(ex.name, []).append(s.exact)
    samples = [{"request": ex.request, "gold": {"name": ex.name, "arguments": ex.arguments},
                "reply": (replies[i] if replies else None), "exact": s.exact}
               for i, (s, ex) in enumerate(zip(scores[:keep], examples[:keep]))]
    return ToolEvalResult(
        examples=n, constrained=constrained, valid=sum(s.valid for s in scores) / n,
        function_accuracy=sum(s.function for s in scores) / n, exact_accuracy=exact / n, exact_ci95=wilson(exact, n),
        argument_accuracy=sum(s.args_right for s in scores) / max(sum(s.args_total for s in scores), 1),
        per_function={k: sum(v) / len(v) for k, v in per.items()}, samples=samples)


def evaluate(backend: Backend, examples: list[ToolExample], tools: list[dict] = TOOLS, constrained: bool = True,
             max_new_tokens: int = 96) -> ToolEvalResult:
    """Greedy replies of a local model to each request with its functions offered, scored against the gold calls.

    ``constrained``: decoded under the call grammar of ``tool_choice`` ``required`` over the offered
    functions (always one valid call); otherwise free, as ``tool_choice`` ``auto`` without its grammar.
    Requests offering the same functions share a generate call (free ones all share).
    """
    from slmkit.data.toolsynth import backend_prompt, check_tools
    from slmkit.runtime.tools import call_grammar

    if not examples:
        raise ConfigError("no examples to evaluate")
    tools = check_tools(tools, "tools")
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.tools if constrained else (), []).append(i)
    replies: list[str] = [""] * len(examples)
    for idx in groups.values():
        offered = [examples[i].offered(tools) for i in idx]
        constraint = call_grammar(offered[0], "required", False) if constrained else None
        prompts = [backend_prompt(backend, examples[i].messages(), o) for i, o in zip(idx, offered)]
        params = GenParams(max_new_tokens=max_new_tokens, constraint=constraint)
        for i, c in zip(idx, backend.generate(prompts, params)):
            replies[i] = c.text
    return aggregate([score_reply(r, ex, tools) for r, ex in zip(replies, examples)], examples, constrained, replies)

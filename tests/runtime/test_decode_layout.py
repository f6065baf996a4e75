"""The fused decode step's table layout: kernels/decode.c's enums (the source of truth) against
slmkit.runtime.decodelayout, both read from the source (no compiler needed) and through the built library's
``slmkit_decode_layout``, which :func:`slmkit.runtime.q4kernel.load_variant` checks before anything uses it."""

import re

import pytest

from slmkit.runtime import decodelayout, q4kernel

DECODE_C = q4kernel.KERNELS / "decode.c"


def parse_layout(source: str) -> dict[str, int]:
    """Every ``enum { A, B = n, ... };`` constant and the ``#define L_N (...)`` of a C source, as C numbers them."""
    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.S)
    values: dict[str, int] = {}
    for body in re.findall(r"\benum\s*\{([^}]*)\}\s*;", source):
        nxt = 0
        for item in (i.strip() for i in body.split(",") if i.strip()):
            name, _, expr = (p.strip() for p in item.partition("="))
            nxt = eval(expr, {}, dict(values)) if expr else nxt  # noqa: S307 (our own C source's integer constants)
            values[name], nxt = nxt, nxt + 1
    for name, expr in re.findall(r"#define\s+(L_N)\s+(\(.*\))", source):
        values[name] = eval(expr, {}, dict(values))  # noqa: S307
    return values


def layout_of(source: str) -> dict[str, int]:
    """The parsed names that belong to the table layout (their prefixes; any other enum a C file adds is its own)."""
    return {k: v for k, v in parse_layout(source).items() if k.split("_")[0] in ("L", "S", "SEG", "KIND", "X", "F")}


def test_decode_c_enums_match_python():
    found = layout_of(DECODE_C.read_text())
    assert found == decodelayout.LAYOUT
    decodelayout.check(found)
    assert decodelayout.L_N == decodelayout.L_SEGS + decodelayout.S_N * decodelayout.SEG_N == 44


@pytest.mark.parametrize(("old", "new", "field"), [
    ("X_WINDOW, X_ROPE,", "X_ROPE, X_WINDOW,", "X_ROPE"),  # two fields swapped
    ("F_ACT, F_NROPE, F_N", "F_ACT, F_NROPE, F_BIAS, F_N", "F_BIAS"),  # a field added on the C side only
    ("SEG_P2, SEG_N", "SEG_N", "SEG_P2"),  # a field dropped
    ("enum { KIND_EMPTY, KIND_Q4, KIND_GGUF };", "enum { KIND_EMPTY, KIND_GGUF, KIND_Q4 };", "KIND_GGUF"),
])
def test_a_drifted_copy_of_decode_c_is_caught(tmp_path, old, new, field):
    source = DECODE_C.read_text()
    assert old in source
    mutated = tmp_path / "decode.c"
    mutated.write_text(source.replace(old, new, 1))
    with pytest.raises(decodelayout.LayoutMismatch, match=rf"{mutated}.*\b{field}: C"):
        decodelayout.check(layout_of(mutated.read_text()), where=str(mutated))


def test_the_library_lists_the_same_layout():
    lib = q4kernel.load()
    if lib is None:
        pytest.skip(f"kernel unavailable: {q4kernel.why_unavailable()}")
    assert decodelayout.from_library(lib) == decodelayout.LAYOUT


def test_loading_a_library_that_disagrees_is_an_error_naming_the_field(monkeypatch):
    if q4kernel.load() is None:
        pytest.skip(f"kernel unavailable: {q4kernel.why_unavailable()}")
    monkeypatch.setitem(decodelayout.LAYOUT, "X_ROPE", 99)  # as if Python had moved a field and C had not
    monkeypatch.setattr(q4kernel, "_libs", {})  # load again (from the cache: nothing is rebuilt)
    for name, value in (("_tried", False), ("_lib", None), ("_why", None)):
        monkeypatch.setattr(q4kernel, name, value)
    with pytest.raises(decodelayout.LayoutMismatch, match=r"kernels/decode.c.*X_ROPE: C 5, Python 99"):
        q4kernel.load()  # not swallowed into "kernel unavailable": torch's path would hide the bug

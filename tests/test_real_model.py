"""End to end on the real Gemma 3 270M (the embedded GGUF), with transformers as the oracle.

transformers loads the GGUF itself (its own dequantization and tensor mapping), so neither the
weights nor the tokenizer of the oracle pass through our code.
"""

import numpy as np
import pytest

import runtime

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
MIXED_TEXTS = [
    "Numbers 1234567890 and 3.14159, dates 2026-11-23.",
    "Whitespace:  two  spaces,   three,\ttab,\n\nnewlines\n   indented.",
    "Accents: café, naïve, Ångström, señor, Zürich, façade.",
    "CJK: 日本語のテキスト、中文文本、한국어 텍스트.",
    "Emoji: 🙂🚀👩‍💻 and symbols ∑ ∫ → ≠ ©.",
    "Code: def f(x):\n    return x**2  # square",
    "Markup: <table><tr><td>cell</td></tr></table> <b>bold</b>",
    "  leading spaces and trailing ones   ",
]


@pytest.fixture(scope="module")
def hf(transformers_gguf):
    return transformers_gguf()


def test_tokenizer_matches_gguf_vocabulary(real_artifacts, hf):
    tok, _ = hf
    ours = runtime.load(real_artifacts).tokenizer
    for text in MIXED_TEXTS:
        want = tok(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == want, text
        assert ours.decode(ours.encode(text)) == text


def test_greedy_continuation_matches_transformers(real_artifacts, hf):
    import torch
    tok, model = hf
    gen = runtime.load(real_artifacts)
    ids = gen.tokenizer.prompt_ids(PROMPT)
    assert ids == tok(PROMPT).input_ids            # BOS + text, as transformers encodes it
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             min_new_tokens=32)
    want = out[0, len(ids):].tolist()
    got = list(gen.stream_ids(ids, max_new_tokens=32))
    assert got == want
    # the text `generate` would show for these ids, through its own streaming detokenizer (not
    # 32 more fp32 decode steps: generate() itself is tested on every tiny model and the server)
    from runtime.generator import TextStream
    stream = TextStream(gen.tokenizer)
    text = "".join(stream.add(t) for t in got) + stream.finish()
    assert text == tok.decode(want)
    assert "France" in text


def test_logits_match_transformers(real_artifacts, hf):
    import torch
    tok, model = hf
    gen = runtime.load(real_artifacts)
    ids = gen.tokenizer.prompt_ids(" ".join(MIXED_TEXTS))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    got = gen.logits(ids, start=len(ids) - 4)
    assert (got.argmax(-1) == want[-4:].argmax(-1)).all()
    # Same fp32 weights; only summation order differs between torch and XLA.
    np.testing.assert_allclose(got, want[-4:], atol=2e-3 * np.abs(want).max(), rtol=0)

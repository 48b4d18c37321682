"""Speculative decoding (`runtime.speculative`) on tiny models: a Gemma 3 target checks a Gemma 2
draft's proposals (same vocabulary) in its verify signature. Greedy output equals the target's
alone on every target; sampled output follows the target's distribution (chi-square over many
seeds, with a draft that mostly disagrees); bad pairs are refused by name."""

import numpy as np
import pytest

import runtime
from runtime import sampling
from runtime.speculative import DraftError

TARGETS = ("xla", "onnx", "tflite")
PROMPT = [2, 10, 20, 30, 40]


@pytest.fixture(scope="module")
def pair():
    """(target artifact, draft artifact): fp32 tiny exports of two families on all targets."""
    from artifacts import exported
    target = exported("random:gemma3-1b-tiny", list(TARGETS), (4, 8), 64, {"quant": "none"},
                      verify_lengths=(8,))
    draft = exported("random:gemma2-2b-tiny", list(TARGETS), (4, 8), 64, {"quant": "none"})
    return target, draft


@pytest.mark.parametrize("target", TARGETS)
def test_greedy_output_is_the_targets_own(pair, target):
    art, draft = pair
    alone = runtime.load(art, target=target)
    spec = runtime.load(art, target=target, draft=draft, draft_target=target)
    assert spec.draft_tokens == (4 if target == "onnx" else 7)
    for n in (1, 2, 9, 40):        # a plain decode, one proposal, a full round and a bit, many
        want = list(alone.stream_ids(PROMPT, max_new_tokens=n))
        run = spec.stream_ids(PROMPT, max_new_tokens=n)
        assert list(run) == want, (target, n)
        assert run.stats["generated_tokens"] == len(want)
        assert 0 <= run.stats["draft_accepted"] <= run.stats["draft_proposed"]
    # two proposals a call, to the end of the 64-slot cache (the last rounds decode)
    two = alone.with_draft(spec.draft, draft_tokens=2)
    assert list(two.stream_ids(PROMPT, max_new_tokens=59)) == \
        list(alone.stream_ids(PROMPT, max_new_tokens=59))


def test_sampled_tokens_follow_the_targets_distribution(pair):
    """The first new token over 1,500 seeds at temperature 25, top-k 6 (where the draft's q and
    the target's p overlap by ~0.35, so most proposals are rejected and the correction is drawn
    from max(0, p - q)): its frequencies fit p, and not what keeping every proposal gives."""
    from scipy.stats import chisquare
    art, draft = pair
    alone, d = runtime.load(art, target="onnx"), runtime.load(draft, target="onnx")
    spec = alone.with_draft(d)
    T, K, n = 25.0, 6, 1500
    p = sampling.probabilities(alone.logits(PROMPT)[-1], T, K)
    q = sampling.probabilities(d.logits(PROMPT)[-1], T, K)
    assert 0.2 < np.minimum(p, q).sum() < 0.6
    counts = np.zeros(p.size)
    accepted = 0
    for seed in range(n):
        run = spec.stream_ids(PROMPT, max_new_tokens=2, temperature=T, top_k=K, seed=seed)
        counts[next(run)] += 1
        run.close()
        accepted += run.stats["draft_accepted"]
    support = np.nonzero(p)[0]
    assert counts.sum() == counts[support].sum() == n
    assert chisquare(counts[support], p[support] * n).pvalue > 1e-3
    wrong = (q[support] + 1e-3) / (q[support] + 1e-3).sum()     # every proposal kept
    assert chisquare(counts[support], wrong * n).pvalue < 1e-6
    assert 0.2 * n < accepted < 0.6 * n


def test_bad_pairs_are_refused(pair, tmp_path):
    import dataclasses
    from compile import export as ex
    from compile.checkpoints import Checkpoint
    from compile.config import get_variant
    from compile.model import init_params
    from compile.tokenizer import tiny_tokenizer
    from compile.weights import Params
    from runtime import contract as ct
    art, draft = pair
    with pytest.raises(DraftError, match="has no verify signature to check a draft's proposals"
                                         " with; export it with --verify-lengths"):
        runtime.load(draft, target="xla", draft=art, draft_target="xla")
    with pytest.raises(ValueError, match="draft_tokens must be an integer from 1 to 7"):
        runtime.load(art, target="xla", draft=draft, draft_target="xla", draft_tokens=8)
    # a model of another vocabulary (256 tokens) as the draft
    cfg = dataclasses.replace(get_variant("gemma3-270m-tiny"), vocab_size=256)
    tok, special = tiny_tokenizer(cfg.vocab_size)
    ck = Checkpoint(cfg, Params.from_arrays(init_params(cfg, 0)), tok, special,
                    source={"format": "random"})
    ex.export(ck, ct.Contract(cfg, (4,), 16), ["onnx"], tmp_path / "v256", {"quant": "none"},
              log=lambda m: None)
    target = runtime.load(art, target="onnx")
    with pytest.raises(DraftError, match=r"the draft \(gemma3-270m-tiny, vocabulary 256, "
                                         r"tokenizer sha256 [0-9a-f]{12}\) does not share the "
                                         r"target's vocabulary \(gemma3-1b-tiny, 512"):
        target.with_draft(runtime.load(tmp_path / "v256", target="onnx"))
    with pytest.raises(ValueError, match="does not combine with a LoRA adapter"):
        target.with_draft(runtime.load(draft, target="onnx")).stream_ids(
            PROMPT, max_new_tokens=8, adapter="any")


def test_generate_cli_with_a_draft(pair):
    """`python -m runtime.generate --draft DIR` (in process): the target's greedy text, what the
    draft did, and a bad draft as one line."""
    from helpers import cli
    art, draft = pair
    plain = cli("runtime.generate", "--artifacts", art, "--target", "onnx", "--prompt", "a b c",
                "--max-new-tokens", "12")
    r = cli("runtime.generate", "--artifacts", art, "--target", "onnx", "--prompt", "a b c",
            "--max-new-tokens", "12", "--draft", draft, "--draft-target", "onnx",
            "--draft-tokens", "3")
    assert r.returncode == 0 and plain.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert "[gemma3-1b-tiny on onnx, drafted by gemma2-2b-tiny on onnx (3 a call)]" in r.stderr
    assert " draft tokens kept; finish: length" in r.stderr
    bad = cli("runtime.generate", "--artifacts", draft, "--target", "xla", "--prompt", "a",
              "--draft", art, "--draft-target", "xla")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: the target artifact (gemma2-2b-tiny, xla) has no verify signature")

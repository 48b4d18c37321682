"""compile.quality: figures on exact small arrays, the evaluation text's structure, and the
export's quality-gate rule."""

import numpy as np
import pytest

from compile import parity, quality


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_figures_on_exact_arrays():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.2, 0.1]], np.float32)
    got = ref.copy()
    got[1] = [3.0, 2.0, 1.0]                          # a different argmax at position 1
    window = np.array([0, 1, 2, 0], np.int32)         # targets of positions 0..2: 1, 2, 0
    f = quality.evaluate(None, None, [window], lambda w: iter(got),   # rows one at a time
                         reference=lambda w: [ref[:2], ref[2:]])      # reference in two chunks
    assert f["positions"] == 4 and f["windows"] == 1
    assert f["top1"] == 0.75
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    assert f["mean_kl"] == pytest.approx(kl, rel=1e-9)
    nll_ref = -(lp[0, 1] + lp[1, 2] + lp[2, 0]) / 3   # the last position has no next token
    nll_got = -(lq[0, 1] + lq[1, 2] + lq[2, 0]) / 3
    assert f["ppl_ref"] == pytest.approx(np.exp(nll_ref), rel=1e-9)
    assert f["ppl_delta_rel"] == pytest.approx(np.exp(nll_got) / np.exp(nll_ref) - 1, rel=1e-9)
    with pytest.raises(ValueError, match="more logit rows than the window has tokens"):
        quality.evaluate(None, None, [window], lambda w: np.concatenate([got, got]),
                         reference=lambda w: [ref])


def test_windows_start_with_bos_and_cover_the_text():
    ids = list(range(10, 30))
    wins = quality.windows(ids, 2, 8)
    assert all(w[0] == 2 and len(w) <= 8 for w in wins)
    assert [t for w in wins for t in w[1:]] == ids
    assert len(quality.windows(ids, 2, 8, limit=7)) == 1


def test_evaluation_text_sections_and_chat_turns():
    kinds = [k for k, _ in quality.sections()]
    for kind in ("prose", "code", "chinese", "russian", "chat"):
        assert kind in kinds
    pieces = []
    ids = quality.eval_ids(lambda s: [len(s)], lambda p: pieces.append(p) or -len(pieces))
    assert "<start_of_turn>" in pieces and "<end_of_turn>" in pieces and "<bos>" not in pieces
    assert len(quality.eval_sha256()) == 64 and len(ids) > 20


def test_heldout_text_is_a_second_text_of_the_same_kinds():
    """The held-out text (never tuned on) has the five kinds, chat turns, and no line of the
    evaluation text; an unknown text name is refused by name."""
    held = quality.sections(quality.eval_text("heldout"))
    assert {k for k, _ in held} == {"prose", "code", "chinese", "russian", "chat"}
    pieces = []
    ids = quality.eval_ids(lambda s: [len(s)], lambda p: pieces.append(p) or -len(pieces),
                           "heldout")
    assert "<start_of_turn>" in pieces and len(ids) > 20
    shared = {line for _, body in quality.sections() for line in body.splitlines()
              if len(line) > 20} & {line for _, body in held for line in body.splitlines()}
    assert not shared
    assert quality.eval_sha256("heldout") != quality.eval_sha256()
    with pytest.raises(ValueError, match="unknown evaluation text 'other'; known: eval, heldout"):
        quality.eval_text("other")


def test_quality_judgement_names_each_miss():
    limits = {"min_top1": 0.9, "max_kl": 0.01, "max_ppl_delta_rel": 0.01}
    assert parity.judge_quality({"top1": 0.95, "mean_kl": 0.005, "ppl_delta_rel": 0.0}, limits) == []
    assert parity.judge_quality({"top1": 0.85, "mean_kl": 0.02, "ppl_delta_rel": 0.03}, limits) == [
        "top-1 agreement 85.0% (minimum 90.0%)", "mean KL 0.0200 (maximum 0.0100)",
        "perplexity +3.00% (maximum +1.00%)"]


def test_reference_on_disk_reads_back_what_the_reference_gives(tmp_path, monkeypatch):
    """The gate's reference goes to disk first; read back in ROW_CHUNK-row chunks it is the
    reference's logits exactly, window by window, and `evaluate_many` figures equal the live
    reference's."""
    from compile import export
    from runtime import contract as ct
    monkeypatch.setattr(quality, "ROW_CHUNK", 5)
    ck = export.random_checkpoint("gemma3-270m-tiny")
    contract = ct.Contract(ck.config, (4, 8), 64)
    rng = np.random.default_rng(2)
    wins = [rng.integers(0, ck.config.vocab_size, n).astype(np.int32) for n in (13, 7)]
    reference = quality.reference_to_disk(contract, ck.params, wins, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference-0.f32", "reference-1.f32"]
    for w in wins:
        live = np.concatenate(list(quality.reference_chunks(contract, ck.params, w)))
        chunks = list(reference(w))
        assert [len(c) for c in chunks] == [5] * (len(w) // 5) + ([len(w) % 5] if len(w) % 5 else [])
        np.testing.assert_array_equal(np.concatenate(chunks), live)
    noisy = {"a": lambda w: quality.reference_chunks(contract, ck.params, w)}
    assert quality.evaluate_many(contract, ck.params, wins, noisy, reference=reference) == \
        quality.evaluate_many(contract, ck.params, wins, noisy)


def test_gate_claims_llama_cpp_only_where_it_ran():
    """The gate's limits and its message: llama.cpp's figures on the same weights where they are
    recorded (the embedded 270M) or can be measured (another GGUF, llama-cpp-python installed);
    fixed limits named as such where llama.cpp never ran on the weights."""
    (sha, text, window), figures = next(iter(parity.LLAMA_CPP_RECORDED.items()))
    assert text == quality.eval_sha256()            # recorded on the text the gate reads
    gguf = {"format": "gguf", "path": "/m.gguf", "sha256": sha}
    f = {"positions": 511, "top1": 0.89, "mean_kl": 0.03, "ppl_delta_rel": 0.02}

    rule = parity.gate_rule(gguf, window, llama_cpp_installed=False)
    assert rule["rule"] == "llama.cpp on the same weights" and not rule["measure"]
    assert rule["limits"] == parity.limits_of(figures) and rule["llama_cpp"] == figures
    assert rule["how"].startswith(f"recorded for this file (sha256 {sha[:12]}")
    problems = parity.judge_quality(f, rule["limits"])
    assert parity.quality_failure("tflite", f, problems, rule) == (
        "tflite: on 511 tokens of the evaluation text top-1 agreement 89.0% (minimum 94.9%); "
        "mean KL 0.0300 (maximum 0.0067); perplexity +2.00% (maximum +1.33%) — worse than "
        "llama.cpp on the same weights; pass --accept-quality-loss to publish it anyway")

    other = {**gguf, "sha256": "0" * 64}
    assert parity.gate_rule(other, window, llama_cpp_installed=True)["measure"]
    assert parity.gate_rule(gguf, window - 1, llama_cpp_installed=True)["measure"]  # another slice
    for source, installed, why in [
            (other, False, "llama-cpp-python is not installed to measure it on this GGUF"),
            ({"format": "hf", "path": "/m"}, True,
             "the checkpoint is not a GGUF file llama.cpp could run"),
            ({**gguf, "lora": {"path": "/a"}}, True,
             "an adapter was merged into the GGUF's weights")]:
        rule = parity.gate_rule(source, window, installed)
        assert rule["rule"] == "fixed limits" and rule["limits"] == parity.QUALITY_LIMITS
        assert rule["llama_cpp"] is None and rule["how"].endswith(why)
        msg = parity.quality_failure("onnx", f, ["top-1 agreement 89.0% (minimum 94.9%)"], rule)
        assert "worse than llama.cpp on the same weights" not in msg
        assert msg.endswith(
            "— below the gate's fixed limits (llama.cpp's figures on the embedded Gemma 3 270M "
            f"Q4_K_M; llama.cpp did not run on these weights: {why}); pass "
            "--accept-quality-loss to publish it anyway"), msg

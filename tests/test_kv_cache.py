"""Level 2: prefill and decode through the external KV cache equal one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile import model, trace
from runtime import contract as ct
from compile.config import get_variant
from helpers import GEMMA4_TINY, TINY_VARIANTS
from runtime.kv import past_slots
from runtime.generator import plan_chunks


@pytest.mark.parametrize("variant", TINY_VARIANTS + GEMMA4_TINY)
def test_chunked_prefill_and_decode_equal_full_forward(variant):
    cfg = get_variant(variant)
    contract = ct.Contract(cfg, (4, 8), 48)
    params = {k: jnp.asarray(v) for k, v in model.init_params(cfg, 3).items()}
    T, start = 30, 23                      # 23 prefill tokens: chunks 8, 8, 8 (7 real + 1 pad)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, T).astype(np.int32)
    want = trace.reference_logits(contract, params, tokens)

    fns = {s.name: jax.jit(trace.signature_fn(contract, s)) for s in contract.signatures()}
    cache = {t.name: jnp.zeros(t.shape, t.dtype) for t in contract.kv_specs()}
    pos = 0
    plan = plan_chunks(0, start, list(contract.prefill_lengths), contract.max_context)
    assert len(plan) > 1
    for n, real in plan:
        chunk = np.zeros(n, np.int32)
        chunk[:real] = tokens[pos:pos + real]
        name = "decode" if n == 1 else f"prefill_{n}"
        out = fns[name](params, {**cache, "tokens": chunk[None], "input_pos":
                                 np.arange(pos, pos + n, dtype=np.int32)})
        cache = {k: v for k, v in out.items() if k != "logits"}
        pos += real
    rows = []
    for p in range(start, T):
        out = fns["decode"](params, {**cache, "tokens": tokens[None, p:p + 1],
                                     "input_pos": np.array([p], np.int32)})
        rows.append(np.asarray(out["logits"][0, 0]))
        cache = {k: v for k, v in out.items() if k != "logits"}
    # float32 summation order only: 2e-5, or 1e-6 of the largest logit where that is more (65 on
    # gemma-2b-tiny, where an Intel Xeon's XLA kernels came 3 ulps, 2.3e-5, from the full forward)
    np.testing.assert_allclose(np.stack(rows), want[start:],
                               atol=max(2e-5, 1e-6 * float(np.abs(want).max())), rtol=0)


# one variant per cache geometry (every step of the test is a compile, ~2 CPU-s): MHA, alternating
# windows, MQA with 5:1 windows, Gemma 4's shared KV (+ per-layer inputs), and k_eq_v with one
# global KV head (+ experts); the other variants differ from these in the forward only, which the
# chunked test above holds for every variant
ROWS_VARIANTS = ["gemma-7b-tiny", "gemma2-2b-tiny", "gemma3-270m-tiny", "gemma4-e2b-tiny",
                 "gemma4-26b-a4b-tiny"]


@pytest.mark.parametrize("variant", ROWS_VARIANTS)
def test_row_outputs_written_by_the_caller_equal_full_forward(variant):
    """Cache outputs `rows`: fed each layer's past slots as the ONNX runtime picks them (the
    filled part, or the window for local layers) and returning only the new rows, which the caller
    writes into its buffers, the model gives the full forward's logits."""
    cfg = get_variant(variant)
    contract = ct.Contract(cfg, (8,), 48)
    params = {k: jnp.asarray(v) for k, v in model.init_params(cfg, 5).items()}
    T, chunks = 23, (8, 5, 8, 1, 1)        # uneven chunks, then single-token steps
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, T).astype(np.int32)
    want = trace.reference_logits(contract, params, tokens)
    step = jax.jit(lambda w, t, p, c: model.forward(cfg, w, t, p, c, logits="last",
                                                    cache_outputs="rows"))
    layout = contract.kv
    caches = {n: c for c in layout.caches for n in c.names}
    bufs = {n: np.zeros(caches[n].rows_shape(contract.max_context), np.float32) for n in caches}
    got, pos = [], 0
    sizes = chunks + (1,) * (T - sum(chunks))
    for n in sizes:
        past = {}
        for name, c in caches.items():
            lo, hi = past_slots(pos, c.past_window)
            past[name] = bufs[name][:, :, lo:hi]
        logits, new = step(params, tokens[None, pos:pos + n], np.arange(pos, pos + n, dtype=np.int32),
                           past)
        for name, c in caches.items():
            rows = np.asarray(new[name])
            assert rows.shape == c.rows_shape(n)
            bufs[name][:, :, pos:pos + n] = rows
        got.append(np.asarray(logits[0, -1]))
        pos += n
    # the split softmax sums in another order than the full one: a few float32 ulps of the logit
    np.testing.assert_allclose(np.stack(got), want[np.cumsum(sizes) - 1], atol=2e-5, rtol=1e-6)


def test_past_slots():
    assert past_slots(0, None) == (0, 1) and past_slots(0, 7) == (0, 1)   # one masked slot
    assert past_slots(5, None) == (0, 5) and past_slots(5, 7) == (0, 5)
    assert past_slots(30, 7) == (23, 30) and past_slots(30, None) == (0, 30)


def test_verify_signatures_score_every_position_on_every_target():
    """verify_N on each target's fp32 artifact: the logits of every scored position equal the
    full forward's, in calls of N tokens (the last padded; near the end of the cache, where N
    would pass it, decode takes over) or, on onnx, of any length (`logit_index`). The export's
    parity check held them to the reference too, beside decode."""
    import json
    import runtime
    from artifacts import exported
    from compile import export as ex
    variant = "gemma3-270m-tiny"
    out = exported(f"random:{variant}", ["xla", "tflite", "onnx"], (4, 8), 64,
                   {"quant": "none"}, verify_lengths=(4,))
    ck = ex.random_checkpoint(variant)
    arts = json.loads((out / "manifest.json").read_text())["artifacts"]
    tokens = np.random.default_rng(5).integers(0, ck.config.vocab_size, 64).astype(np.int32)
    want = trace.reference_logits(ct.Contract(ck.config, (4, 8), 64), ck.params, tokens)
    for target in ("xla", "tflite", "onnx"):
        assert arts[target]["parity"]["verify"]["top1_agreement"] == 1.0, target
        gen = runtime.load(out, target=target)
        assert gen.verify_tokens == (64 if target == "onnx" else 4)
        # positions 41..63: verify at 41, 45, ..., 57 (61 + 4 passes the cache: decode 61-63)
        got = gen.logits(tokens, start=41, verify=True)
        np.testing.assert_allclose(got, want[41:], atol=5e-5, rtol=0, err_msg=target)
        short = gen.logits(tokens[:11], start=5, verify=True)   # 4 + 2 real in a padded call
        np.testing.assert_allclose(short, want[5:11], atol=5e-5, rtol=0, err_msg=target)

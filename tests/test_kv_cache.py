"""Level 2: prefill and decode through the external KV cache equal one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile import model, trace
from compile import signatures as sg
from compile.config import get_variant
from helpers import TINY_VARIANTS
from runtime.generator import plan_chunks


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_chunked_prefill_and_decode_equal_full_forward(variant):
    cfg = get_variant(variant)
    contract = sg.Contract(cfg, (4, 8), 48)
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
    np.testing.assert_allclose(np.stack(rows), want[start:], atol=2e-5, rtol=0)

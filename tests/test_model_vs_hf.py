"""Level 3: our JAX model (through our HF loader) equals transformers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compile.checkpoints import load
from compile.config import get_variant
from compile.model import forward
from helpers import GEMMA4_TINY, TINY_VARIANTS, write_hf_checkpoint


@pytest.mark.parametrize("variant", TINY_VARIANTS + GEMMA4_TINY)
def test_logits_match_transformers(variant, tmp_path):
    cfg = get_variant(variant)
    hf_model = write_hf_checkpoint(cfg, tmp_path)
    ck = load(tmp_path)
    assert ck.config.family == cfg.family
    assert ck.config.layer_types == cfg.layer_types
    T = 3 * (cfg.sliding_window or 8) + 5          # longer than the sliding window
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, T)).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()
    got, _ = forward(ck.config, {k: jnp.asarray(v) for k, v in ck.params.items()},
                     jnp.asarray(tokens), jnp.arange(T, dtype=jnp.int32))
    got = np.asarray(got)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

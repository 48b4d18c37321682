"""Quantization recipes (`compile.recipes`): the rotation and the smoothing scales change what the
int8 kernels see, never the float model. Exact small arrays, then every family's tiny model: its
weights transformed as the tflite target stores them (before quantization) and run through the
recipe's graph forms give the reference's logits, with and without run-time LoRA slots."""

import jax.numpy as jnp
import numpy as np
import pytest

from compile import export as ex
from compile import model, recipes
from compile.targets import tflite
from runtime import contract as ct


def test_hadamard_blocks_are_orthogonal_and_rotate_rows_as_the_graph_rotates_inputs():
    for n in (1, 2, 8, 128):
        h = recipes.hadamard(n)
        np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-6)
        np.testing.assert_array_equal(h, h.T)
    assert [recipes.block_of(k) for k in (640, 1024, 48, 7, 256)] == [128, 128, 16, 1, 128]
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((5, 48)).astype(np.float32), rng.standard_normal((3, 48))
    # x W^T == rot(x) rot_rows(W)^T: the rotation cancels in the product
    np.testing.assert_allclose(np.asarray(recipes.rotate(jnp.asarray(x, jnp.float32))) @
                               recipes.rotate_rows(w).T, x @ w.T, atol=1e-5)
    with pytest.raises(ValueError, match="unknown recipe 'best'; choose one of plain, rotate, "
                                         "rotate-smooth"):
        recipes.plan("best", None, set())


def _forward(cfg, params, tokens, forms=model.REFERENCE):
    logits, _ = model.forward(cfg, params, jnp.asarray(tokens)[None],
                              jnp.arange(len(tokens), dtype=jnp.int32), forms=forms)
    return np.asarray(logits)[0]


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma3-270m-tiny",
                                     "gemma4-e2b-tiny", "gemma4-26b-a4b-tiny"])
def test_transformed_weights_compute_the_reference(variant):
    ck = ex.load_checkpoint(f"random:{variant}")
    cfg = ck.config
    params = {k: np.asarray(ck.params[k], np.float32) for k in ck.params}
    quantized = tflite.quantized_names(params, "int8", False)
    if variant == "gemma3-270m-tiny":   # calibrated on the reference, as the export does
        r = recipes.plan("rotate-smooth", cfg, quantized, params, ck.tokenizer_model,
                         ck.special_ids["bos"])
        assert r.record()["smoothing"]["calibration"]["tokens"] == \
            [recipes.CALIBRATION_START, recipes.CALIBRATION_START + recipes.CALIBRATION_TOKENS]
    else:   # any maxima give a recipe that computes the same function: random ones, quicker
        rng = np.random.default_rng(0)
        r = recipes.plan("rotate-smooth", cfg, quantized, params, stats={
            n: rng.uniform(0.1, 10.0, recipes._inputs(cfg, n)).astype(np.float32)
            for n in quantized if n == "embed" or n.rsplit(".", 1)[-1] in recipes.PROJECTIONS})
    assert "embed" in r.rotated and "embed" in r.scales and r.norms
    assert any(n.endswith("down_proj") for n in r.scales)
    if not cfg.v_norm:   # o_proj's scales fold into v_proj (Gemma 4 normalizes its values)
        assert any(n.endswith("o_proj") for n in r.scales)
    # every scale differs from 1: the check below would pass on an untouched model otherwise
    assert all(float(np.abs(np.log(s)).max()) > 1e-3 for s in r.scales.values())
    stored = {k: r.transform(k, v) for k, v in params.items()}
    assert not np.allclose(stored["embed"], params["embed"])
    forms = tflite.Forms(stored, r)
    tokens = np.arange(2, 40, dtype=np.int32) % cfg.vocab_size
    want = _forward(cfg, params, tokens)
    got = _forward(cfg, stored, tokens, forms)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)

    # run-time LoRA slots read the original inputs and add to the original outputs
    slots = ct.lora_slots(cfg)
    rng = np.random.default_rng(1)
    lora = {}
    for s in slots:
        a = rng.standard_normal((s.n_in, 2)).astype(np.float32) * 0.3
        b = rng.standard_normal((2, s.n_out)).astype(np.float32) * 0.3
        lora[f"layers.{s.layer}.{s.target}{model.LORA_A}"] = a
        lora[f"layers.{s.layer}.{s.target}{model.LORA_B}"] = b
    want = _forward(cfg, {**params, **lora}, tokens)
    got = _forward(cfg, {**stored, **lora}, tokens, forms)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)

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
                                         "rotate-smooth, rotate-smooth-gptq$"):
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


def test_gptq_rounds_each_projection_for_the_inputs_its_stored_weight_sees():
    """rotate-smooth-gptq on the tiny Gemma 3: the calibration's input moments, carried into the
    stored inputs' form (divided by s, rotated: `Recipe.input_moments`), equal those measured on
    the stored model's own inputs over the same windows; every projection is rounded on
    int8_rows' grid (the head, to nearest, by the target), closer than nearest in that norm."""
    from compile.weights import quant as wq
    ck = ex.load_checkpoint("random:gemma3-270m-tiny")
    cfg = ck.config
    params = {k: np.asarray(ck.params[k], np.float32) for k in ck.params}
    quantized = tflite.quantized_names(params, "int8", False)
    raw = {}
    real_calibrate = recipes.calibrate

    def calibrate(*args, **kw):          # keep the moments the plan is handed, layer by layer
        on_layer = args[5] if len(args) > 5 else kw.get("on_layer")

        def keep(layer, stats, moments):
            raw.update(moments)
            on_layer(layer, stats, moments)
        return real_calibrate(*args[:5], on_layer=keep)
    recipes.calibrate = calibrate
    try:
        r = recipes.plan(recipes.GPTQ, cfg, quantized, params, ck.tokenizer_model,
                         ck.special_ids["bos"])
    finally:
        recipes.calibrate = real_calibrate
    projections = {n for n in quantized if n != "embed"}
    assert set(r.rounded) == projections == set(raw) and "embed" not in r.rounded
    assert r.record()["rounding"] == {"kind": "gptq", "damp": recipes.GPTQ_DAMP,
                                      "block": wq.GPTQ_BLOCK, "matmuls": len(projections),
                                      "calibration": r.calibration}
    with pytest.raises(ValueError, match="recipe rotate-smooth-gptq rounds with the "
                                         "calibration's input moments"):
        recipes.plan(recipes.GPTQ, cfg, quantized, params, stats={})

    stored = {k: r.transform(k, v) for k, v in params.items()}
    seen = {}

    class Inputs(tflite.Forms):      # what each stored weight multiplies, on the stored model
        def project(self, x, p, name, layer):
            full = f"layers.{layer}.{name}"
            xs = recipes.rotate(x) if full in r.rotated else x
            x2 = np.asarray(xs, np.float64).reshape(-1, xs.shape[-1])
            seen[full] = seen.get(full, 0.0) + x2.T @ x2
            return super().project(x, p, name, layer)

    wins, _ = recipes.calibration_windows(ck.tokenizer_model, ck.special_ids["bos"])
    for w in wins:
        _forward(cfg, stored, w, Inputs(stored, r))
    total = {"gptq": 0.0, "nearest": 0.0}
    for n in sorted(projections):
        h = r.input_moments(n, raw[n])
        np.testing.assert_allclose(h, seen[n], rtol=2e-3, atol=2e-3 * np.abs(seen[n]).max())
        rows = np.asarray(stored[n], np.float32).T                                # [out, in]
        q, scale = r.int8(n)
        nearest, nearest_scale = wq.int8_rows(rows)
        np.testing.assert_array_equal(scale, nearest_scale)

        def loss(qq):
            e = rows - qq * scale[:, None]
            return float(np.einsum("oi,ij,oj->", e, seen[n], e))
        assert loss(q) <= loss(nearest), n
        total["gptq"] += loss(q)
        total["nearest"] += loss(nearest)
    assert total["gptq"] < 0.9 * total["nearest"], total

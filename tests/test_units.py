"""Level 1: exact small-array checks of the building blocks and the runtime's bookkeeping."""

import jax.numpy as jnp
import numpy as np
import pytest

from compile import model
from runtime import contract as ct
from compile.config import VARIANTS, get_variant
from runtime import sampling
from runtime.generator import plan_chunks


def test_rms_norm_scales_by_one_plus_weight():
    x = np.array([[3.0, 4.0]], np.float32)
    w = np.array([0.0, 1.0], np.float32)
    rms = np.sqrt((9 + 16) / 2)
    got = np.asarray(model.rms_norm(jnp.asarray(x), jnp.asarray(w), 0.0))
    np.testing.assert_allclose(got, [[3 / rms, 2 * 4 / rms]], rtol=1e-6)


def test_rope_rotates_halves():
    # H = 4: pairs (x0, x2) rotate at frequency 1, (x1, x3) at base**-0.5.
    x = jnp.asarray(np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 1, 4))
    pos = jnp.asarray([2], jnp.int32)
    got = np.asarray(model.rope(x, pos, base=100.0, scale=1.0)).ravel()
    a0, a1 = 2.0, 2.0 / 10.0
    want = [1 * np.cos(a0) - 3 * np.sin(a0), 2 * np.cos(a1) - 4 * np.sin(a1),
            3 * np.cos(a0) + 1 * np.sin(a0), 4 * np.cos(a1) + 2 * np.sin(a1)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    scaled = np.asarray(model.rope(x, jnp.asarray([16], jnp.int32), base=100.0, scale=8.0)).ravel()
    np.testing.assert_allclose(scaled, got, rtol=1e-6)   # linear scaling divides the position


def test_registry_dimensions():
    assert VARIANTS["gemma-2b"].num_kv_heads == 1
    assert VARIANTS["gemma-7b"].num_kv_heads == VARIANTS["gemma-7b"].num_heads
    g2 = VARIANTS["gemma2-9b"]
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window) == (50.0, 30.0, 4096)
    assert g2.layer_types[:2] == ("local", "global")
    assert VARIANTS["gemma2-27b"].query_pre_attn_scalar == 4608 / 32
    g3 = VARIANTS["gemma3-270m"]
    assert g3.layer_types[:6] == ("local",) * 5 + ("global",)
    assert (g3.rope_base_local, g3.rope_base_global, g3.sliding_window) == (1e4, 1e6, 512)
    assert VARIANTS["gemma3-4b"].rope_scale_global == 8.0
    assert VARIANTS["gemma3-4b"].sliding_window == 1024
    assert 250e6 < g3.num_params() < 290e6
    assert 2.4e9 < VARIANTS["gemma-2b"].num_params() < 2.6e9
    with pytest.raises(KeyError, match="unknown Gemma variant 'gemma4'"):
        get_variant("gemma4")


def test_contract_shapes_and_names():
    c = ct.Contract(get_variant("gemma3-270m"))
    names = [s.name for s in c.signatures()]
    assert names == ["prefill_32", "prefill_128", "prefill_512", "decode"]
    dec = c.signature("decode")
    shapes = {t.name: t.shape for t in dec.inputs}
    assert shapes["tokens"] == (1, 1) and shapes["input_pos"] == (1,)
    assert shapes["kv_cache_k_0"] == (1, 1, 2048, 256)
    assert shapes["kv_cache_v_17"] == (1, 1, 256, 2048)
    assert [t.name for t in dec.outputs][0] == "logits"
    assert "logits" not in [t.name for t in c.signature("prefill_32").outputs]
    with pytest.raises(ValueError, match="exceeds max context"):
        ct.Contract(get_variant("gemma3-270m"), (32, 4096), 2048)


def test_verify_signatures_in_the_contract_and_the_cli():
    cfg = get_variant("gemma3-270m")
    c = ct.Contract(cfg, (32,), 256, lora_rank=4, verify_lengths=(8, 4, 8))
    assert c.verify_lengths == (4, 8)
    assert [s.name for s in c.signatures()] == [
        "prefill_32", "decode", "verify_4", "verify_8",
        "lora_prefill_32", "lora_decode", "lora_verify_4", "lora_verify_8"]
    v = c.signature("verify_8")
    assert v.kind == ct.VERIFY and [t.shape for t in v.inputs[:2]] == [(1, 8), (8,)]
    assert v.outputs[0].name == ct.LOGITS and v.outputs[0].shape == (1, 8, cfg.vocab_size)
    back = ct.Contract.from_manifest({"model": {"config": cfg.__dict__},
                                      "signatures": c.to_manifest()})
    assert back.verify_lengths == (4, 8) and ct.Contract(cfg).verify_lengths == ()
    with pytest.raises(ValueError, match="verify lengths must be integers from 1 to the max "
                                         "context 256, got"):
        ct.Contract(cfg, (32,), 256, verify_lengths=(512,))
    from compile import export
    assert export._parser().parse_args([]).verify_lengths == ct.DEFAULT_VERIFY_LENGTHS == (8,)
    assert export._parser().parse_args(["--verify-lengths", "none"]).verify_lengths == ()
    assert export._parser().parse_args(["--verify-lengths", "4,16"]).verify_lengths == (4, 16)


@pytest.mark.parametrize("start,count,want", [
    (0, 0, []),
    (0, 3, [(4, 3)]),
    (0, 8, [(8, 8)]),
    (0, 13, [(8, 8), (8, 5)]),
    (0, 20, [(8, 8), (8, 8), (4, 4)]),
    (58, 5, [(4, 4), (1, 1)]),    # near the end of a 64-slot cache: never past it
    (62, 2, [(1, 1), (1, 1)]),
])
def test_plan_chunks(start, count, want):
    plan = plan_chunks(start, count, [4, 8], 64)
    assert plan == want
    assert sum(r for _, r in plan) == count
    pos = start
    for n, real in plan:
        assert pos + n <= 64
        pos += real


def test_sampling_greedy_and_filters():
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    assert sampling.sample(logits) == 1
    rng = np.random.default_rng(0)
    draws = {sampling.sample(logits, 1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sampling.sample(logits, 1.0, top_p=0.3, rng=rng) for _ in range(50)}
    assert draws == {1}
    # the same seed draws the same tokens; another seed draws others
    flat = np.zeros(64)
    draws = lambda seed: [sampling.sample(flat, 1.0, rng=r) for r in [np.random.default_rng(seed)]
                          for _ in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5, top_k=None, top_p=None), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan"), top_k=None, top_p=None), "temperature must be"),
    (dict(temperature=1.0, top_k=-1, top_p=None), "top_k must be an integer >= 0"),
    (dict(temperature=1.0, top_k=2.5, top_p=None), "top_k must be an integer"),
    (dict(temperature=1.0, top_k=None, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=None, top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_sampling_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling.validate(**kwargs)


def test_kv_layout_is_per_layer():
    """Layers may differ in KV heads and head size, and a layer may own no cache (it reads
    another's): every name and shape comes from the layout."""
    layout = ct.KVLayout((ct.LayerCache(0, 2, 16, 8), ct.LayerCache(2, 1, 32, None)), 64)
    assert {t.name: t.shape for t in layout.specs()} == {
        "kv_cache_k_0": (1, 2, 64, 16), "kv_cache_v_0": (1, 2, 16, 64),     # K BKSH, V BKHS
        "kv_cache_k_2": (1, 1, 64, 32), "kv_cache_v_2": (1, 1, 32, 64)}
    assert {t.name: t.shape for t in layout.specs(ct.ROWS, 5)} == {
        "kv_cache_k_0": (1, 2, 5, 16), "kv_cache_v_0": (1, 2, 5, 16),
        "kv_cache_k_2": (1, 1, 5, 32), "kv_cache_v_2": (1, 1, 5, 32)}
    assert (layout.owner(0).past_window, layout.owner(2).past_window) == (7, None)
    with pytest.raises(KeyError, match="layer 1 reads no cache"):
        layout.owner(1)
    assert layout.nbytes() == 4 * (2 * 64 * 16 * 2 + 64 * 32 * 2)


def test_gemma4_layout_shares_caches_and_widens_global_heads():
    """Gemma 4 E2B as published: 35 layers (4 local : 1 global), the last 20 read the cache of
    layer 13 (local) or 14 (global); global layers have head dim 512. From the manifest's dict
    as from the config: the runtime derives the same layout without the compiler."""
    from compile.config import get_variant
    cfg = get_variant("gemma4-e2b")
    for config in (cfg, cfg.to_dict()):
        layout = ct.KVLayout.of(config, 64)
        assert [c.layer for c in layout.caches] == list(range(15))
        assert layout.owner(15).layer == 13 and layout.owner(19).layer == 14
        assert layout.owner(34).layer == 14 and layout.owner(33).layer == 13
        assert {(c.kv_heads, c.head_dim, c.window) for c in layout.caches} == {
            (1, 256, 512), (1, 512, None)}
        assert "kv_cache_k_15" not in layout.names and len(layout.names) == 30
    moe = get_variant("gemma4-26b-a4b")
    heads = {(c.kv_heads, c.head_dim) for c in ct.KVLayout.of(moe).caches}
    assert heads == {(8, 256), (2, 512)}                  # k_eq_v global layers: 2 KV heads
    # a shared layer of a type no earlier layer has is refused, naming it
    bad = dict(cfg.to_dict(), num_layers=3, layer_types=["local", "local", "global"],
               kv_shared_layers=1)
    with pytest.raises(ValueError, match="layer 2 .global. shares the KV cache of an earlier "
                                         "global layer, and there is none"):
        ct.KVLayout.of(bad)


def test_rows_cache_passes_the_window_and_writes_rows_in_place():
    from runtime.kv import RowsCache
    layout = ct.KVLayout((ct.LayerCache(0, 1, 2, 4), ct.LayerCache(1, 1, 2, None)), 8)
    cache = RowsCache(layout)
    state = cache.new()
    rows = {n: np.arange(12, dtype=np.float32).reshape(1, 1, 6, 2) for n in layout.names}
    cache.write(state, 0, rows)                      # positions 0..5
    assert state["kv_cache_v_1"][0, 0, :, 0].tolist() == [0, 2, 4, 6, 8, 10, 0, 0]
    past = cache.past(state, 6)
    assert past["kv_cache_k_0"][0, 0, :, 0].tolist() == [6, 8, 10]     # local: window - 1 slots
    assert past["kv_cache_k_1"][0, 0, :, 0].tolist() == [0, 2, 4, 6, 8, 10]
    assert past["kv_cache_k_1"].base is not None                       # a view, not a copy
    assert cache.past(state, 0)["kv_cache_k_0"].shape == (1, 1, 1, 2)  # one masked slot


def test_int8_rows_exact():
    from compile.weights.quant import int8_rows
    q, scale = int8_rows(np.array([[1.0, -0.3, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]]))
    np.testing.assert_array_equal(scale, np.float32([1 / 127, 1.0, 2.0]))
    np.testing.assert_array_equal(q, [[127, -38, 32], [0, 0, 0], [-127, 64, 0]])  # rint: ties to even


def test_int8_rows_gptq_spreads_rounding_errors_over_correlated_inputs():
    """GPTQ on the per-row int8 grid: exact small arrays, then against a column-by-column float64
    GPTQ written out here (blocks of 128 exercised), never worse than rounding to nearest in the
    calibration's norm |(W - Q) X^T|."""
    from compile.weights.quant import GPTQ_BLOCK, int8_rows, int8_rows_gptq
    h = np.array([[1, 0, 0], [0, 1, 0.9], [0, 0.9, 1]], np.float32)   # inputs 1 and 2 move together
    q, scale = int8_rows_gptq(np.array([[127.0, 0.4, 0.4], [0.0, 0.0, 0.0]]), h, 0.0)
    np.testing.assert_array_equal(scale, np.float32([1.0, 1.0]))       # int8_rows' scales
    # input 1 rounds 0.4 -> 0; its error, carried through H, lifts input 2 to 0.76 -> 1
    np.testing.assert_array_equal(q, [[127, 0, 1], [0, 0, 0]])
    # a damping that dwarfs H is rounding to nearest
    np.testing.assert_array_equal(int8_rows_gptq(np.array([[127.0, 0.4, 0.4]]), h, 1e9)[0],
                                  [[127, 0, 0]])
    dead = h.copy()
    dead[0, 0] = 0.0          # an input no calibration token reached: rounded to nearest
    np.testing.assert_array_equal(int8_rows_gptq(np.array([[126.6, 0.6, 0.4]]), dead, 0.0)[0],
                                  [[127, 1, 0]])

    rng = np.random.default_rng(0)
    N, K, T = 24, GPTQ_BLOCK + 172, 200                  # fewer tokens than inputs: H singular
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = (rng.standard_normal((T, K)) @ rng.standard_normal((K, K)) * 0.1).astype(np.float32)
    h = x.T @ x
    q, scale = int8_rows_gptq(w, h, 0.5)
    np.testing.assert_array_equal(scale, int8_rows(w)[1])
    H = h.astype(np.float64)
    H[np.diag_indices(K)] += 0.5 * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    W, want, s = w.astype(np.float64), np.zeros((N, K)), scale.astype(np.float64)[:, None]
    for i in range(K):
        want[:, i] = np.clip(np.rint(W[:, i] / s[:, 0]), -127, 127)
        e = (W[:, i:i + 1] - want[:, i:i + 1] * s) / U[i, i]
        W[:, i + 1:] -= e * U[i, i + 1:][None, :]
    assert (q != want).mean() < 1e-3 and np.abs(q - want).max() <= 1   # float32 vs float64 ties

    def loss(qq):
        return float(np.sum(((w - qq * scale[:, None]) @ x.T) ** 2))
    assert loss(q) < 0.8 * loss(int8_rows(w)[0])


def test_int4_blocks_exact_and_packing():
    from compile.weights.quant import int4_blocks, pack_int4, unpack_int4
    w = np.array([[7.0, -3.5, 1.0, 0.0, 0.5, -1.0, 0.25, 0.0]], np.float32)
    q, scale = int4_blocks(w, block=4)
    assert scale.dtype == np.float16 and scale.shape == (1, 2)
    assert float(scale[0, 0]) == 1.0
    # 1/7 rounded to a 7-bit mantissa (bf16) first: 0.142578125, exact in float16
    assert float(scale[0, 1]) == 0.142578125
    np.testing.assert_array_equal(q, [[7, -4, 1, 0, 4, -7, 2, 0]])   # -3.5 -> -4 (ties to even)
    packed = pack_int4(q)
    np.testing.assert_array_equal(packed, np.uint8([0xC7, 0x01, 0x94, 0x02]))
    np.testing.assert_array_equal(unpack_int4(packed, 8), q.reshape(-1))
    with pytest.raises(ValueError, match="int4: a row of 6 values does not split into blocks of 4"):
        int4_blocks(np.zeros((2, 6)), block=4)


def test_int_blocks_asym_exact_small_arrays():
    from compile.weights.quant import int_blocks_asym
    # block 1: min -1, max 2 -> scale 3/15 = 0.2, bias -1 + 8 * 0.2 = 0.6; block 2: constant 5
    w = np.array([[-1.0, 2.0, 0.0, 0.45, 5.0, 5.0, 5.0, 5.0]], np.float32)
    b = int_blocks_asym(w, 4, 4)
    assert b.bits == 4 and b.block == 4 and b.source == "int4-asym"
    np.testing.assert_allclose(b.scale[0, 0], 0.2, rtol=1e-7)
    np.testing.assert_allclose(b.bias[0, 0], 0.6, rtol=1e-6)
    np.testing.assert_array_equal(b.q[0, :4], [-8, 7, -3, -1])     # rint((w + 1) / 0.2) - 8
    np.testing.assert_array_equal(b.q[0, 4:], [-8] * 4)             # a constant block: its min
    np.testing.assert_allclose(b.dequantize()[0, 4:], 5.0, rtol=1e-6)
    # min and max are on the grid: reproduced to float rounding
    d = b.dequantize()
    np.testing.assert_allclose(d[0, :2], [-1.0, 2.0], atol=1e-6)
    assert np.abs(d - w).max() <= 0.1 + 1e-6                       # at most half a step
    # a grid the block's values already lie on (a dequantized Q4_1 block) comes back exactly
    grid = (np.arange(16, dtype=np.float32) * 0.25 - 1.5).reshape(1, 16)
    np.testing.assert_allclose(int_blocks_asym(grid, 4, 16).dequantize(), grid, atol=1e-6)
    with pytest.raises(ValueError, match="int4: a row of 6 values does not split into blocks of 4"):
        int_blocks_asym(np.zeros((2, 6)), 4, 4)


def test_int_blocks_scale_search_finds_a_coarser_grid_and_never_loses():
    from compile.weights.quant import Blocks, int_blocks
    rng = np.random.default_rng(3)
    d = rng.random((64, 4, 1)).astype(np.float32) * 0.01 + 1e-3
    grid = (rng.integers(-16, 16, (64, 4, 32)) * d).reshape(64, 128).astype(np.float32)
    q, s = int_blocks(grid, 8, 32, search=True)     # 5-bit values: some m <= 127 is a multiple
    np.testing.assert_allclose(Blocks(8, 32, q, s).dequantize(), grid, rtol=0, atol=1e-7)
    q0, s0 = int_blocks(grid, 8, 32)                 # max / 127: off the grid
    assert np.abs(Blocks(8, 32, q0, s0).dequantize() - grid).max() > 1e-5
    w = rng.standard_normal((64, 128)).astype(np.float32)
    err = {k: ((Blocks(8, 32, *int_blocks(w, 8, 32, search=k)).dequantize() - w) ** 2).sum(1)
           for k in (False, True)}
    assert (err[True] <= err[False]).all() and err[True].sum() < 0.9 * err[False].sum()
    assert np.abs(int_blocks(w, 8, 32, search=True)[0]).max() <= 127   # nothing clipped


def test_sampling_refuses_non_finite_logits():
    for bad, counts in (([0.0, np.nan, 1.0], "1 NaN and 0 infinite of 3"),
                        ([np.inf, 0.0, -np.inf, np.nan], "1 NaN and 2 infinite of 4")):
        for temperature in (0.0, 0.7):
            with pytest.raises(sampling.NonFiniteLogits, match=counts):
                sampling.sample(np.array(bad, np.float32), temperature)
    with pytest.raises(sampling.NonFiniteLogits, match="1 NaN and 0 infinite of 4"):
        sampling.sample(np.array([0.0, np.nan, 1.0, 2.0], np.float32), 1.0, top_k=3)
    assert sampling.sample(np.array([0.0, 3.0, 1.0], np.float32)) == 1


def test_native_log_noise_is_dropped_and_errors_are_kept(capfd):
    """What LiteRT and TensorFlow log on fd 2 while a model loads: their INFO/WARNING lines are
    dropped; an ERROR line and what Python printed meanwhile reach stderr, in order."""
    import os
    import sys
    from runtime.backends.base import quiet_native_logs
    noise = ("INFO: [environment.cc:36] Creating LiteRT environment with options\n"
             "WARNING: [npu_registry.cc:34] NPU accelerator could not be loaded\n"
             "└ Could not load shared library libLiteRtCompilerPlugin_IntelOpenvino.so\n"
             "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
             "WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR\n"
             "I0000 00:00:1796649698.558149    6170 port.cc:153] oneDNN custom operations are on.\n")
    with quiet_native_logs():
        os.write(2, noise.encode())
        print("python says", file=sys.stderr)
        os.write(2, b"ERROR: [compiled_model.cc:12] model is broken\n")
    assert capfd.readouterr().err == "python says\nERROR: [compiled_model.cc:12] model is broken\n"
    os.write(2, b"INFO: [environment.cc:36] after the block\n")   # only inside it
    assert capfd.readouterr().err == "INFO: [environment.cc:36] after the block\n"

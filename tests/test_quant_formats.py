"""Quantization formats: GGUF's blocks kept unchanged (`--quant native`), against `gguf`'s own
dequantization, through the ONNX container and end to end on a block-quantized tiny GGUF."""

import json

import numpy as np
import pytest

import runtime
from compile import checkpoints, export as ex, trace
from compile.weights import Params, Tensor, gguf_blocks
from compile.weights import onnx as container
from runtime import contract as ct
from helpers import assert_stores_gguf_values, write_quantized_gguf

CONTRACT = dict(prefill_lengths=(4, 8), max_context=64)
TYPES = {"embed": "Q8_0", "q_proj": "Q5_0", "k_proj": "Q4_1", "v_proj": "Q8_0",
         "o_proj": "Q4_0", "gate_proj": "Q5_1", "up_proj": "Q5_0", "down_proj": "Q4_1"}


def _raw_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """GGUF bytes of a [rows, cols] tensor of `type_name`: gguf's quantizer where it has one,
    random bytes with sane float16 fields for the K types (any bit pattern of their integer
    fields is a valid block)."""
    import gguf
    qt = gguf.GGMLQuantizationType[type_name]
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    except NotImplementedError:
        pass
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (size - 2,)}[type_name]
    for off in halves:   # d (and dmin) as small positive float16 values
        raw[:, off:off + 2] = (rng.random(len(raw)) * 0.01 + 1e-4).astype(np.float16
                                                                          ).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", gguf_blocks.SUPPORTED)
def test_gguf_blocks_dequantize_to_what_gguf_dequantizes(type_name):
    import gguf
    rng = np.random.default_rng(0)
    raw = _raw_blocks(type_name, 6, 512, rng)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(6, 512)
    b = gguf_blocks.decode(raw, type_name, (6, 512))
    got = b.dequantize()
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    bits, block, bias = gguf_blocks.layout(type_name)
    assert (b.bits, b.block, b.bias is not None) == (bits, block, bias)
    assert b.q.min() >= -(1 << (bits - 1)) and b.q.max() < (1 << (bits - 1))   # fits its bits
    # through the ONNX container: what MatMulNBits reads ((u - zero point) * scale + bias)
    cbits = container.container_bits(b)
    u = container.packed(b).reshape(6, -1)
    if cbits == 4:
        u = np.stack([u & 15, u >> 4], -1).reshape(6, -1)
    stored = (u.astype(np.float32) - (1 << (cbits - 1))).reshape(6, -1, block) \
        * b.scale[..., None] + (0 if b.bias is None else b.bias[..., None])
    assert np.abs(stored.reshape(6, 512) - want).max() <= 1e-6 * np.abs(want).max()


def test_a_type_without_a_decoder_is_refused_by_name():
    with pytest.raises(ValueError, match="no block decoder for GGUF type Q2_K; decodable: Q8_0"):
        gguf_blocks.decode(np.zeros((1, 84), np.uint8), "Q2_K", (1, 256))
    from compile.targets import onnx as onnx_target
    t = Tensor("layers.0.q_proj", (256, 64), np.dtype(np.float32), lambda: None, format="Q2_K")
    with pytest.raises(ValueError, match=r"tensor layers\.0\.q_proj is stored as Q2_K, which the "
                                         r"onnx target cannot keep .*targets that can take it: "
                                         r"xla \(as float32\)"):
        onnx_target.quantized(Params({t.name: t}), t.name, "native", False)


@pytest.fixture(scope="module")
def native_gguf(tmp_path_factory):
    from compile.model import init_params
    from compile.config import get_variant
    cfg = get_variant("gemma3-270m-tiny")
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    write_quantized_gguf(cfg, init_params(cfg, 3), path, TYPES)
    return path


def test_native_onnx_keeps_every_gguf_block(native_gguf, tmp_path):
    ck = checkpoints.load(str(native_gguf))
    contract = ct.Contract(ck.config, **CONTRACT)
    out = tmp_path / "art"
    ex.export(ck, contract, ["onnx", "xla"], out, {"quant": "native"}, log=lambda m: None)
    man = json.loads((out / "manifest.json").read_text())["artifacts"]
    onnx_formats = man["onnx"]["tensor_formats"]
    assert onnx_formats["layers.0.k_proj"] == "Q4_1 kept: MatMulNBits 4-bit, block 32, + block-sum bias"
    assert onnx_formats["layers.0.q_proj"] == "Q5_0 kept: MatMulNBits 8-bit, block 32"
    assert onnx_formats["embed"] == "Q8_0 kept: MatMulNBits 8-bit, block 32"
    assert onnx_formats["final_norm"] == "float32"
    assert man["xla"]["tensor_formats"]["layers.0.q_proj"] == "float32 (from Q5_0)"
    assert man["onnx"]["op_counts"]["MatMulNBits"] == 7 * ck.config.num_layers + 1

    # the stored integers and scales are GGUF's: dequantized, equal to gguf's dequantization
    pairs = {"layers.2.k_proj": "blk.2.attn_k.weight", "layers.1.down_proj": "blk.1.ffn_down.weight",
             "layers.0.q_proj": "blk.0.attn_q.weight", "embed": "token_embd.weight"}
    assert_stores_gguf_values(out, native_gguf, pairs)

    # end to end: logits near the reference (the kernels quantize activations per 32-block),
    # the same top-1 nearly everywhere; xla holds the exact values
    tokens = np.random.default_rng(5).integers(0, ck.config.vocab_size, 30).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = runtime.load(out, target="onnx").logits(tokens, start=13)
    assert np.abs(got - want[13:]).max() < 0.05 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want[13:].argmax(-1)) >= 0.9
    got_xla = runtime.load(out, target="xla").logits(tokens, start=13)
    np.testing.assert_allclose(got_xla, want[13:], atol=5e-5, rtol=0)


def test_tflite_cannot_keep_gguf_blocks_and_says_who_can(native_gguf, tmp_path):
    """Refused before any work, naming the tensor, its type and the targets that can keep it; a
    float checkpoint passes (native = its own float32)."""
    from compile.targets import tflite
    ck = checkpoints.load(str(native_gguf))
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=r"--quant native: tensor embed is stored as Q8_0, which "
                                         r"the tflite target cannot keep .*targets that can take "
                                         r"it: onnx, xla \(as float32\)"):
        ex.export(ck, ct.Contract(ck.config, **CONTRACT), ["tflite"], out, {"quant": "native"},
                  log=lambda m: None)
    assert not out.exists() and not list(tmp_path.iterdir())
    tiny = ex.random_checkpoint("gemma3-270m-tiny")
    tflite.check_checkpoint(tiny.params, {"quant": "native"})      # float: nothing to refuse
    from compile import targets
    assert targets.exact(tflite, {"quant": "native"}, tiny.params)


def test_native_onnx_with_float_activations_computes_the_blocks_exactly(native_gguf, tmp_path):
    """--activations float: 4-bit blocks at accuracy level 1, 8-bit ones as two 4-bit halves;
    the stored values are still gguf's, and the logits are the reference's up to float rounding
    (the int8-activation default is only near them: test above)."""
    ck = checkpoints.load(str(native_gguf))
    contract = ct.Contract(ck.config, **CONTRACT)
    out = tmp_path / "art"
    ex.export(ck, contract, ["onnx"], out, {"quant": "native", "activations": "float"},
              log=lambda m: None)
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]
    assert art["activations"] == "float"
    formats = art["tensor_formats"]
    assert formats["layers.0.q_proj"] == "Q5_0 kept: MatMulNBits 8-bit, block 32, as two 4-bit halves"
    assert formats["layers.0.k_proj"] == "Q4_1 kept: MatMulNBits 4-bit, block 32, + block-sum bias"
    import onnx
    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert {a["bits"] for a in attrs} == {4} and {a["accuracy_level"] for a in attrs} == {1}

    pairs = {"layers.0.q_proj": "blk.0.attn_q.weight", "embed": "token_embd.weight",
             "layers.2.k_proj": "blk.2.attn_k.weight", "layers.1.down_proj": "blk.1.ffn_down.weight"}
    assert_stores_gguf_values(out, native_gguf, pairs)

    tokens = np.random.default_rng(5).integers(0, ck.config.vocab_size, 30).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = runtime.load(out, target="onnx").logits(tokens, start=13)
    np.testing.assert_allclose(got, want[13:], atol=1e-4 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want[13:].argmax(-1)).all()


def test_activations_option_is_checked_per_target():
    from compile import targets
    with pytest.raises(ValueError, match=r"target 'tflite' does not support --activations float; "
                                         r"its matmuls' activations are fixed by --quant"):
        targets.check_options(targets.get("tflite"), {"activations": "float"})
    targets.check_options(targets.get("xla"), {"activations": "float"})
    targets.check_options(targets.get("onnx"), {"activations": "float"})
    with pytest.raises(ValueError, match=r"target 'xla' does not support --activations int8; "
                                         r"it supports: float"):
        targets.check_options(targets.get("xla"), {"activations": "int8"})


def test_recipe_option_is_checked_per_target():
    from compile import targets
    tfl = targets.get("tflite")
    for quant in ("int8", "int4"):
        for recipe in ("plain", "rotate", "rotate-smooth"):
            targets.check_options(tfl, {"quant": quant, "recipe": recipe})
    targets.check_options(tfl, {"quant": "none", "recipe": "plain"})
    targets.check_options(tfl, {"quant": "int8", "recipe": "rotate-smooth-gptq"})
    with pytest.raises(ValueError, match=r"^--recipe rotate-smooth-gptq: GPTQ rounds to per-row "
                                         r"int8; with --quant int4 use rotate-smooth$"):
        targets.check_options(tfl, {"quant": "int4", "recipe": "rotate-smooth-gptq"})
    with pytest.raises(ValueError, match=r"^--recipe rotate: tflite --quant none keeps the weights "
                                         r"in float, which no recipe changes; recipes apply to "
                                         r"int8 and int4$"):
        targets.check_options(tfl, {"quant": "none", "recipe": "rotate"})
    # several targets: the recipe is tflite's (the slotted real export passes plain with xla and
    # onnx); refused only when no target asked for has recipes
    targets.check_recipe([targets.get(t) for t in ("xla", "onnx", "tflite")], {"recipe": "plain"})
    with pytest.raises(ValueError, match=r"^--recipe plain applies to none of the targets asked "
                                         r"for \(onnx, xla\); recipes prepare weights for "
                                         r"LiteRT's int8 kernels: the tflite target's int8 and "
                                         r"int4$"):
        targets.check_recipe([targets.get("onnx"), targets.get("xla")], {"recipe": "plain"})


def test_int8_of_a_dequantized_gguf_recovers_its_grids(native_gguf, tmp_path):
    """`--quant int8` on a checkpoint whose values lie on GGUF grids: least-error scales bring
    Q8_0, Q5_0 and Q4_0 values back exactly in symmetric blocks, and the offset grid of Q4_1 in
    asymmetric ones (chosen because they halve the error); the manifest says which."""
    ck = checkpoints.load(str(native_gguf))
    out = tmp_path / "art"
    ex.export(ck, ct.Contract(ck.config, **CONTRACT), ["onnx"], out,
              {"quant": "int8", "activations": "float"}, log=lambda m: None)
    formats = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]["tensor_formats"]
    assert formats["layers.0.k_proj"] == ("int8: MatMulNBits 8-bit, block 32, asymmetric "
                                          "(+ block-sum bias), as two 4-bit halves "
                                          "(re-quantized from Q4_1)")
    assert formats["layers.0.q_proj"] == ("int8: MatMulNBits 8-bit, block 32, symmetric, as two "
                                          "4-bit halves (re-quantized from Q5_0)")
    pairs = {"layers.0.k_proj": "blk.0.attn_k.weight", "layers.1.down_proj": "blk.1.ffn_down.weight",
             "layers.0.q_proj": "blk.0.attn_q.weight", "layers.1.up_proj": "blk.1.ffn_up.weight",
             "layers.2.v_proj": "blk.2.attn_v.weight", "layers.0.o_proj": "blk.0.attn_output.weight",
             "embed": "token_embd.weight"}
    assert_stores_gguf_values(out, native_gguf, pairs)

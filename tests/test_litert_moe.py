"""LiteRT's MoE op ("moe", XNNPACK's MoeExpertsDelegateKernel) as the tflite target stores and
emits it: small exact arrays through the stored forms, then the op in a converted .tflite, run by
LiteRT, against a plain per-token loop in numpy on the same weights. (The whole tiny 26B-A4B on
tflite is checked against transformers in test_gemma4.)"""

from types import SimpleNamespace

import numpy as np
import pytest

from compile import litert_moe
from runtime import contract as ct

E, K, D, I, T = 4, 2, 64, 32, 5


def _stacks(rng):
    """gate/up [E, D, I], down [E, I, D]: the model's expert stacks."""
    return {"experts_gate": rng.standard_normal((E, D, I)).astype(np.float32) * .2,
            "experts_up": rng.standard_normal((E, D, I)).astype(np.float32) * .2,
            "experts_down": rng.standard_normal((E, I, D)).astype(np.float32) * .2}


def _loop(src, top_w, top_i, stacks, expert_scale):
    """The math, one token and one chosen expert at a time (Gemma 4's experts)."""
    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    out = np.zeros_like(src)
    for t in range(src.shape[1]):
        x = src[0, t].astype(np.float64)
        for j in range(top_i.shape[-1]):
            e = top_i[0, t, j]
            a = gelu(x @ stacks["experts_gate"][e]) * (x @ stacks["experts_up"][e])
            out[0, t] += expert_scale[e] * top_w[0, t, j] * (a @ stacks["experts_down"][e])
    return out


def test_stored_forms_hold_each_expert_as_rows_of_out_by_expert():
    """Row (o, e) is expert e's output o; int4 packs element 2i in the low nibble, per block of
    32 inputs, and dequantizes to the same values the quantizer kept (exact small arrays)."""
    stack = np.zeros((2, 64, 3), np.float32)                      # [E, in, out]
    stack[1, :, 2] = np.arange(64) % 15 - 7                      # expert 1, output 2: int4 values
    stack[0, :32, 0] = 7.0
    stack[0, 32:, 0] = -0.4375                                   # -7 / 16
    for wt in ("fp32", "int8", "int4"):
        w, scale = litert_moe.stored_form(lambda e: stack[e], stack.shape, wt)
        assert w.shape == ((3, 2, 1, 32) if wt == "int4" else (3, 2, 1, 64))
        back = np.asarray(litert_moe.dequantize(w, scale, 64))
        atol = 7 / 127 / 2 if wt == "int8" else 0                # int8: half a step of one row
        np.testing.assert_allclose(back[2, 1, 0], stack[1, :, 2], atol=atol, rtol=0)
        np.testing.assert_allclose(back[0, 0, 0], stack[0, :, 0], atol=atol, rtol=0)
    w, scale = litert_moe.stored_form(lambda e: stack[e], stack.shape, "int4")
    assert scale.shape == (3, 2, 1, 2) and scale.dtype == np.float32
    np.testing.assert_array_equal(scale[0, 0, 0], [1.0, 0.0625])  # max|block| / 7
    assert w.view(np.uint8)[2, 1, 0, 0] == (0x9 | (0xA << 4))     # -7 low, -6 high


def test_weight_type_falls_back_to_int8_rows_when_inputs_are_not_whole_blocks():
    shapes = {"experts_gate": (E, 64, 40), "experts_up": (E, 64, 40),
              "experts_down": (E, 40, 64)}
    assert litert_moe.weight_type("int4", shapes) == "int8"
    shapes["experts_down"] = (E, 64, 64)
    assert litert_moe.weight_type("int4", shapes) == "int4"
    assert litert_moe.weight_type("none", shapes) == "fp32"


@pytest.mark.parametrize("quant,atol", [("none", 1e-5), ("int8", 1e-5), ("int4", 1e-5)])
def test_litert_runs_the_op_as_the_stored_forms_say(tmp_path, quant, atol):
    """The converted op, run by LiteRT, on 5 tokens (experts shared between tokens, one expert
    chosen by none) and on 1 token, equals the per-token loop over the dequantized stored forms
    (so only float rounding differs); the JAX form of the op gives the same."""
    import jax
    import jax.numpy as jnp
    from ai_edge_litert.interpreter import Interpreter
    from compile.targets import tflite

    rng = np.random.default_rng(0)
    stacks = _stacks(rng)
    expert_scale = rng.uniform(.5, 1.5, E).astype(np.float32)
    wt = litert_moe.weight_type(quant, {k: v.shape for k, v in stacks.items()})
    consts, deq = {"expert_scale": expert_scale}, {}
    for name, s in stacks.items():
        w, scale = litert_moe.stored_form(lambda e, s=s: s[e], s.shape, wt)
        consts[name + litert_moe.SUFFIX] = w
        if scale is not None:
            consts[name + litert_moe.SUFFIX + "_scale"] = scale
        n_in = s.shape[1]
        # back to the model's [E, in, out]
        deq[name] = np.asarray(litert_moe.dequantize(w, scale, n_in))[:, :, 0, :].transpose(1, 2, 0)

    def fn(p, inputs):
        return {"out": litert_moe.experts(inputs["src"], inputs["top_w"], inputs["top_i"],
                                          p, E, K)}

    sigs = {}
    for n in (T, 1):
        sig = ct.Signature(f"moe_{n}", ct.PREFILL if n > 1 else ct.DECODE, n,
                           (ct.TensorSpec("src", (1, n, D), "float32"),
                            ct.TensorSpec("top_w", (1, n, K), "float32"),
                            ct.TensorSpec("top_i", (1, n, K), "int32")),
                           (ct.TensorSpec("out", (1, n, D), "float32"),))
        sigs[sig.name] = SimpleNamespace(fn=fn, signature=sig)
    path = tmp_path / "moe.tflite"
    tflite.convert(sigs, consts, path)

    from ai_edge_litert import schema_py_generated as S
    model = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    for sg in model.subgraphs:     # the op itself, not the JAX math lowered to builtin ops
        codes = [model.operatorCodes[op.opcodeIndex] for op in sg.operators]
        assert [c.customCode for c in codes if c.customCode] == [b"moe"], sg.name
    it = Interpreter(model_path=str(path))
    src = rng.standard_normal((1, T, D)).astype(np.float32)
    top_w = rng.uniform(0, 1, (1, T, K)).astype(np.float32)
    top_i = np.array([[[0, 1], [1, 0], [2, 1], [0, 2], [1, 2]]], np.int32)   # expert 3: none
    for n in (T, 1):
        inputs = {"src": src[:, :n], "top_w": top_w[:, :n], "top_i": top_i[:, :n]}
        got = it.get_signature_runner(f"moe_{n}")(**inputs)["out"]
        want = _loop(*inputs.values(), deq, expert_scale)
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
        jax_out = jax.jit(fn)({k: jnp.asarray(v) for k, v in consts.items()},
                              {k: jnp.asarray(v) for k, v in inputs.items()})["out"]
        np.testing.assert_allclose(np.asarray(jax_out), want, atol=atol, rtol=1e-5)


def test_options_kept_past_the_flatbuffer_come_back_inside_it(tmp_path):
    """A converter file over 2 GB keeps custom ops' options after the flatbuffer (offset from
    the file's start); `weights.tflite.finish` moves every buffer, so it must bring them inside.
    The same op, with its options moved out as the converter does it, runs and gives the same
    output after finish."""
    import flatbuffers
    from ai_edge_litert.interpreter import Interpreter
    from litert_converter import schema_py_generated as S
    from compile.targets import tflite
    from compile.weights import tflite as container

    rng = np.random.default_rng(1)
    stacks = _stacks(rng)
    consts = {"expert_scale": np.ones(E, np.float32)}
    for name, s in stacks.items():
        consts[name + litert_moe.SUFFIX], _ = litert_moe.stored_form(lambda e, s=s: s[e],
                                                                     s.shape, "fp32")

    def fn(p, inputs):
        return {"out": litert_moe.experts(inputs["src"], inputs["top_w"], inputs["top_i"],
                                          p, E, K)}
    sig = ct.Signature("decode", ct.DECODE, 1, (ct.TensorSpec("src", (1, 1, D), "float32"),
                                                ct.TensorSpec("top_w", (1, 1, K), "float32"),
                                                ct.TensorSpec("top_i", (1, 1, K), "int32")),
                       (ct.TensorSpec("out", (1, 1, D), "float32"),))
    tflite.convert({"decode": SimpleNamespace(fn=fn, signature=sig)}, consts, tmp_path / "a.tflite")

    model = S.ModelT.InitFromPackedBuf(bytearray((tmp_path / "a.tflite").read_bytes()), 0)
    moved = []
    for op in model.subgraphs[0].operators:
        if op.customOptions is not None and len(op.customOptions):
            moved.append(bytes(np.asarray(op.customOptions, np.uint8)))
            op.customOptions = None
    assert len(moved) == 1
    b = flatbuffers.Builder(1 << 16)
    # the offset is a uint64 either way: pack once to learn the size, then with the real offset
    for offset in (1 << 40, None):
        if offset is None:
            offset = -(-len(head) // 16) * 16
        for op in model.subgraphs[0].operators:
            if S.BuiltinOperator.CUSTOM == model.operatorCodes[op.opcodeIndex].builtinCode:
                op.largeCustomOptionsOffset, op.largeCustomOptionsSize = offset, len(moved[0])
        b = flatbuffers.Builder(1 << 16)
        b.Finish(model.Pack(b), file_identifier=b"TFL3")
        head = bytes(b.Output())
    (tmp_path / "b.tflite").write_bytes(head + b"\0" * (offset - len(head)) + moved[0])
    container.finish(tmp_path / "b.tflite", tmp_path / "c.tflite", {})

    inputs = {"src": rng.standard_normal((1, 1, D)).astype(np.float32),
              "top_w": np.array([[[0.7, 0.3]]], np.float32), "top_i": np.array([[[3, 1]]], np.int32)}
    want = Interpreter(model_path=str(tmp_path / "a.tflite")).get_signature_runner()(**inputs)
    got = Interpreter(model_path=str(tmp_path / "c.tflite")).get_signature_runner()(**inputs)
    np.testing.assert_array_equal(got["out"], want["out"])
    # LiteRT itself reads the moved options at that offset: the layout is the converter's
    moved_out = Interpreter(model_path=str(tmp_path / "b.tflite")).get_signature_runner()(**inputs)
    np.testing.assert_array_equal(moved_out["out"], want["out"])
    assert np.abs(want["out"]).max() > 0

"""LiteRT's mixture-of-experts op: how the tflite target runs Gemma 4's experts.

LiteRT has one op for this: the TFLite CUSTOM op "moe", which XNNPACK's delegate runs
(`tflite/delegates/xnnpack/moe_delegate_kernel.cc`; LiteRT's CompiledModel and LiteRT-LM's engine
register it for CPU, with no flag). For each token it reads only the rows of its k chosen experts,
groups the tokens by expert (prefill runs each chosen expert once over its tokens; an expert no
token chose is never read), and computes

    out[t] = sum_j  per_expert_scale[e] * top_weights[t, j] * down_e(gelu_tanh(gate_e x) * up_e x)
             with e = top_indices[t, j]

so a decode step reads k experts' weights, not E (issue 17's requirement), in one op per layer.
The alternatives lose: a float gather of the chosen experts keeps the 26B-A4B's experts in
float32 (~90 GB), and per-expert conditionals (TFL IF) have their constants lifted out of the
branches by the converter and replan on every call.

The op's contract, which this module owns (read from the kernel's source and checked by running
ai-edge-litert 2.3.0):
  inputs   src [B, T, D] f32, top_weights [B, T, k] f32, top_indices [B, T, k] int32,
           then per weight_type:
             fp32: gate [I, E, 1, D], up [I, E, 1, D], down [D, E, 1, I] f32
             int8: each weight int8 (per row) followed by its f32 scale [out, E, 1, 1]
             int4: each weight packed two values a byte (element 2i in the low nibble) as int8
                   [out, E, 1, in / 2], followed by its f32 scale [out, E, 1, in / block]
           and last per_expert_scale [E] f32. Every weight, scale and per-expert scale must be a
           constant of the model (the delegate refuses computed ones).
  layout   row (o, e) of a weight is expert e's output o: [out, E, 1, in], so an expert's rows
           are strided by E (the kernel copies and dequantizes the rows it needs per call).
  options  flexbuffer map: num_experts, num_active_experts, model_dim, hidden_dim, weight_type
           ("fp32" | "int8" | "int4"), activation ("gelu_tanh": Gemma's GeGLU).
  output   [B, T, D] f32.

In JAX the op is a primitive (`experts`) whose lowering is, while `emitting()`, the StableHLO
custom call `tfl.custom` with the op's code and options as a string backend_config, which the
LiteRT converter turns into that CUSTOM op as it is; otherwise the same math in JAX (dequantized
weights), so a traced signature can also run and be tested without LiteRT.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .weights import quant as wq

CUSTOM_CODE = "moe"
ACTIVATION = "gelu_tanh"
KEYS = ("experts_gate", "experts_up", "experts_down")   # the model's [E, in, out] stacks
SUFFIX = "_litert"            # the op's stored form of a stack: <key>_litert (+ _scale)
WEIGHT_TYPES = {"none": "fp32", "int8": "int8", "int4": "int4"}
BLOCK = wq.INT4_BLOCK         # int4: inputs per scale

_emit = threading.local()


@contextlib.contextmanager
def emitting():
    """While active (in this thread), `experts` lowers to LiteRT's custom op: the tflite target's
    trace. JAX caches a jitted function's lowering, so trace a fresh function inside it (the
    tflite target wraps each signature anew)."""
    was = getattr(_emit, "on", False)
    _emit.on = True
    try:
        yield
    finally:
        _emit.on = was


def weight_type(quant: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The op's weight type for a tflite quantization: int4 needs every stack's input width to
    be whole blocks (a tiny model's may not be), else per-row int8."""
    wt = WEIGHT_TYPES[quant]
    if wt == "int4" and any(shapes[k][1] % BLOCK for k in KEYS):
        return "int8"
    return wt


def stored_form(part, shape: tuple[int, ...], wt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One model stack [E, in, out] -> the op's (weight, scale or None); `part(e)` reads expert
    e's [in, out] alone, so the stack is never held in its source form whole."""
    E, n_in, n_out = shape
    rows = np.empty((n_out, E, n_in), np.float32)                         # [out, E, in]
    for e in range(E):     # the transposed float copy is the only whole one
        rows[:, e, :] = np.asarray(part(e), np.float32).T
    rows = rows.reshape(n_out * E, n_in)                                  # row o * E + e
    if wt == "fp32":
        return rows.reshape(n_out, E, 1, n_in), None
    if wt == "int8":
        q, scale = wq.int8_rows(rows)
        return q.reshape(n_out, E, 1, n_in), scale.reshape(n_out, E, 1, 1)
    q, scale = wq.int4_blocks(rows, BLOCK)
    del rows
    packed = wq.pack_int4(q).view(np.int8).reshape(n_out, E, 1, n_in // 2)
    return packed, np.asarray(scale, np.float32).reshape(n_out, E, 1, n_in // BLOCK)


def dequantize(w: np.ndarray, scale: np.ndarray | None, n_in: int) -> np.ndarray:
    """The op's stored form back to float [out, E, 1, in] (numpy or jax arrays)."""
    import jax.numpy as jnp
    if scale is None:
        return w
    if w.shape[-1] == n_in:                                               # int8 per row
        return w.astype(jnp.float32) * scale
    b = w.astype(jnp.int32) & 0xFF                                        # packed int4
    lo, hi = (b & 0x0F) ^ 8, (b >> 4) ^ 8                                 # offset binary
    q = (jnp.stack([lo, hi], axis=-1).reshape(*w.shape[:-1], n_in) - 8).astype(jnp.float32)
    groups = scale.shape[-1]
    q = q.reshape(*w.shape[:-1], groups, n_in // groups)
    return (q * scale[..., None]).reshape(*w.shape[:-1], n_in)


def _options(E: int, k: int, D: int, I: int, wt: str) -> bytes:
    from flatbuffers import flexbuffers
    return bytes(flexbuffers.Dumps({
        "num_experts": E, "num_active_experts": k, "model_dim": D, "hidden_dim": I,
        "weight_type": wt, "activation": ACTIVATION}))


def _reference(src, top_w, top_i, *weights, E, k, D, I, wt):
    """The op's math in JAX: src [B, T, D], top_w/top_i [B, T, k]."""
    import jax
    import jax.numpy as jnp
    scaled = wt != "fp32"
    ws = list(weights[:-1])
    pes = weights[-1]
    mats = []
    for j, n_in in enumerate((D, D, I)):
        w, s = (ws[2 * j], ws[2 * j + 1]) if scaled else (ws[j], None)
        mats.append(dequantize(w, s, n_in)[:, :, 0, :])                  # [out, E, in]
    gate, up, down = mats
    g = jnp.einsum("btd,ied->btei", src, gate)                            # [B, T, E, I]
    u = jnp.einsum("btd,ied->btei", src, up)
    y = jnp.einsum("btei,dei->bted", jax.nn.gelu(g, approximate=True) * u, down)
    combine = (jax.nn.one_hot(top_i, E, dtype=src.dtype) * top_w[..., None]).sum(axis=2)
    return jnp.einsum("bted,bte->btd", y, combine * pes.reshape(-1))


def _primitive():
    from jax.extend.core import Primitive
    from jax.extend.mlir import ir
    from jax.extend.mlir.dialects import stablehlo
    from jax.interpreters import mlir
    import jax

    p = Primitive("litert_moe")
    p.def_impl(lambda *args, **kw: _reference(*args, **kw))
    p.def_abstract_eval(lambda src, *args, **kw: jax.core.ShapedArray(src.shape, src.dtype))
    reference = mlir.lower_fun(_reference, multiple_results=False)

    def lower(ctx, *args, E, k, D, I, wt):
        if not getattr(_emit, "on", False):
            return reference(ctx, *args, E=E, k=k, D=D, I=I, wt=wt)
        # LiteRT's converter turns a custom call to "tfl.<op>" whose backend_config is a string
        # holding the op's MLIR attributes into that TFL op (legalize_hlo custom_call.cc)
        config = ('{custom_code = "%s", custom_option = #tfl<const_bytes : "0x%s">}'
                  % (CUSTOM_CODE, _options(E, k, D, I, wt).hex().upper()))
        op = stablehlo.CustomCallOp([mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])], list(args),
                                    "tfl.custom", backend_config=ir.StringAttr.get(config),
                                    api_version=ir.IntegerAttr.get(
                                        ir.IntegerType.get_signless(32), 1))
        return op.results

    mlir.register_lowering(p, lower)
    return p


_PRIM = None
_PRIM_LOCK = threading.Lock()


def experts(h, top_w, top_i, p: dict, E: int, k: int):
    """The experts' output [B, T, D] for h [B, T, D], top_w [B, T, k] (renormalised routing
    weights, without the per-expert scale) and top_i [B, T, k], from the stored forms in p
    (`<key>_litert`, `<key>_litert_scale`, and `expert_scale`)."""
    import jax.numpy as jnp
    global _PRIM
    with _PRIM_LOCK:
        if _PRIM is None:
            _PRIM = _primitive()
    g = p[KEYS[0] + SUFFIX]
    I, D = g.shape[0], h.shape[-1]
    scaled = KEYS[0] + SUFFIX + "_scale" in p
    wt = "fp32" if not scaled else ("int8" if g.shape[-1] == D else "int4")
    weights = []
    for key in KEYS:
        weights.append(p[key + SUFFIX])
        if scaled:
            weights.append(p[key + SUFFIX + "_scale"])
    weights.append(p["expert_scale"].astype(jnp.float32))
    return _PRIM.bind(h.astype(jnp.float32), top_w.astype(jnp.float32),
                      top_i.astype(jnp.int32), *weights, E=E, k=k, D=D, I=I, wt=wt)

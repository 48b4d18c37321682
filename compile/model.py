"""The one JAX definition of the Gemma decoder (Gemma 1, 2, 3 and 4 text models).

Gemma 4's additions are config switches of the same layer (`config.GemmaConfig`): norms x w,
unscaled V norm, proportional RoPE and wider heads on global layers, k_eq_v, KV sharing (a shared
layer attends over its producer's keys and values of the same call and cache), a double-wide FFN
on shared layers, per-layer embeddings (PLE: `per_layer_inputs`, then a gated block after each
layer), a mixture of experts beside the dense FFN (`moe`), and a per-layer output scalar.

Parameters are a flat dict `name -> array` (names from `param_shapes`), so every checkpoint loader,
target and weight file shares one naming. Linear weights are stored [in, out] and applied as plain
2-D matmuls: every target lowers those to its fastest kernel (FULLY_CONNECTED, MatMul/MatMulNBits,
dot) without reshaping einsums.

A matmul of `runtime.contract.LORA_TARGETS` may carry a run-time low-rank slot beside its weight
(`project`: `<name>_lora_a` [in, R], `<name>_lora_b` [R, out]), which adds (x A) B; a LoRA adapter
merged at export (`compile.lora`) changes the weight itself instead.

The tied embedding is `embed` [V, D]; Gemma 4's per-layer table is `ple_embed` [V, L*P].

This module is the float reference and knows no target. Where a target stores or computes a part
of the model otherwise (an int8 lookup table, experts as LiteRT's MoE op or as one ONNX branch
each, attention's matmuls as jax2onnx wants them), it hands `forward` a `Forms` of its own (a
subclass, in the target's module), which reads its stored names and returns what the float form
returns; `Forms()` itself is the reference. The forms change the graph, never the math.

The KV cache is a plain value passed in and returned: a dict under `runtime.contract`'s names, taken
and returned as `compile.kv` decides. With `cache=None` the model attends over the given tokens
only: that full forward is the reference every cached path and every artifact is checked against.

Shape letters: B batch, T tokens in this call, S cache length, N query heads, K KV heads,
G = N / K query heads per KV head, H head dim, D model dim, F FFN dim, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from runtime import contract as ct

from . import kv
from .config import GemmaConfig, LOCAL


LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "router", "ple_gate", "ple_proj", "ple_model_proj")
EXPERTS = ("experts_gate", "experts_up", "experts_down")   # [E, in, out]: one matmul per expert
SCALES = ("layer_scalar", "router_scale", "expert_scale")  # multiplicative, like norm weights


def is_linear(name: str) -> bool:
    """A matmul weight [in, out] (the tied embedding is not one: it is [V, D])."""
    return name.rsplit(".", 1)[-1] in LINEAR


def keeps_float(name: str) -> bool:
    """Matmuls every target keeps in float32 when it quantizes: Gemma 4's expert router (E
    outputs, 0.01 % of the weights), whose rounding would pick other experts (llama.cpp's
    quantizer keeps its `ffn_gate_inp` unquantized for the same reason)."""
    return name.rsplit(".", 1)[-1] == "router"


def is_experts(name: str) -> bool:
    """A stack of expert matmul weights [E, in, out]."""
    return name.rsplit(".", 1)[-1] in EXPERTS


ATTENTION_MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj")   # those a layer computes
FFN_MATMULS = ("gate_proj", "up_proj", "down_proj")


def param_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    D = cfg.d_model
    shapes = {"embed": (cfg.vocab_size, D), "final_norm": (D,)}
    if cfg.ple_dim:
        LP = cfg.num_layers * cfg.ple_dim
        shapes.update({"ple_embed": (cfg.ple_vocab_size, LP), "ple_model_proj": (D, LP),
                       "ple_proj_norm": (cfg.ple_dim,)})
    for a in cfg.attention():   # the per-layer spec (`runtime.contract.layer_specs`)
        i, H, matmuls = a.layer, a.head_dim, dict(a.matmuls)
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (D,)
        shapes.update({p + n: matmuls[n] for n in ATTENTION_MATMULS if n in matmuls})
        shapes[p + "ffn_norm"] = (D,)
        shapes.update({p + n: matmuls[n] for n in FFN_MATMULS})
        if cfg.post_norms:
            shapes[p + "post_attn_norm"] = (D,)
            shapes[p + "post_ffn_norm"] = (D,)
        if cfg.qk_norm:
            shapes[p + "q_norm"] = (H,)
            if a.produces_kv:
                shapes[p + "k_norm"] = (H,)
        if cfg.layer_scalar:
            shapes[p + "layer_scalar"] = (1,)
        if cfg.ple_dim:
            shapes.update({p + "ple_gate": (D, cfg.ple_dim), p + "ple_proj": (cfg.ple_dim, D),
                           p + "ple_norm": (D,)})
        if cfg.num_experts:
            E, I = cfg.num_experts, cfg.moe_ffn_dim
            shapes.update({
                p + "router": (D, E), p + "router_scale": (D,), p + "expert_scale": (E,),
                p + "experts_gate": (E, D, I), p + "experts_up": (E, D, I),
                p + "experts_down": (E, I, D),
                p + "moe_norm": (D,),          # before the experts
                p + "post_mlp_norm": (D,),     # after the dense FFN
                p + "post_moe_norm": (D,),     # after the experts
            })
    return shapes


def init_params(cfg: GemmaConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights (for tiny test configs). Norm scales are random too, so (1 + w) is tested."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        out[name] = (rng.standard_normal(shape) * init_std(name, shape)
                     + init_mean(cfg, name)).astype(dtype)
    return out


def init_mean(cfg: GemmaConfig, name: str) -> float:
    """Where random weights centre: 1 for scales that multiply as they are (Gemma 4's norms x w,
    layer scalars, router scales), else 0 (Gemma 1-3's norms x (1 + w))."""
    short = name.rsplit(".", 1)[-1]
    scale = short in SCALES or short.endswith("norm")
    return 1.0 if scale and (short in SCALES or not cfg.norm_plus_one) else 0.0


def init_std(name: str, shape: tuple) -> float:
    """Scale of random weights: norms and scales 0.2, the embeddings 1, a linear weight
    1/sqrt(fan-in)."""
    short = name.rsplit(".", 1)[-1]
    if short.endswith("norm") or short in SCALES:
        return 0.2
    if name in ("embed", "ple_embed"):
        return 1.0
    return shape[-2] ** -0.5


def full_size_std(name: str, shape: tuple) -> float:
    """Scale of random full-size weights (`random:VARIANT`, `compile.synthetic`): as `init_std`
    but the embedding 8/sqrt(D). The embedding sets two scales. The residual stream starts at
    std * sqrt(D) = 8, above what each layer adds (about 1), so a random network of many layers
    stays close to its input and quantization noise does not swing its top-1 at random (a
    unit-scale stream made random Gemma 3 1B int4 agree on only 63 % of clear positions). The
    tied output's logits are ~N(0, 8) for other tokens: with a unit-scale table they were
    ~N(0, sqrt(D)), which Gemma 2's final softcap (30) flattened together (random Gemma 2 2B: 0 of
    32 positions with a clear top-1, every export failed its parity check). The router [D, E]:
    std 3, so the router's logits are ~N(0, 3) (its input has unit norm): at 1/sqrt(D) they were
    ~N(0, 0.02), all E experts' probabilities equal to 1 %, and any rounding picked other
    experts (random 26B-A4B int4: 0 % top-1 agreement)."""
    if name.endswith("router"):
        return 3.0
    return 8.0 * shape[1] ** -0.5 if name == "embed" else init_std(name, shape)


def full_size_params(cfg: GemmaConfig, seed: int = 0):
    """Random full-size weights made on the fly (`weights.seeded`): `full_size_std` scales,
    centred by `init_mean` (Gemma 4's scales multiply as they are: centred on 0 they shrank each
    layer's output ~5x, 30 layers to nothing, and a random 26B-A4B int4 export agreed on 0 % of
    top-1s).

    Where attention is not scaled (Gemma 4: scaling 1, the trained q/k norm weights carry the
    scale), q_norm and k_norm are drawn around head_dim^-1/4 each, so that q.k has the
    1/sqrt(head_dim) scale of Gemma 1-3: around 1 the scores were ~N(0, 16) and every softmax
    nearly one-hot, a network so sensitive that int4 rounding alone (in the JAX reference, no
    artifact involved) moved random full-size E2B's logits by 1.23 x the largest logit (KL 1.75);
    scaled, 0.44 (KL 0.13)."""
    from .weights import seeded
    shapes = param_shapes(cfg)

    def qk(name: str) -> float:
        unscaled = cfg.query_pre_attn_scalar == 1.0 and not cfg.norm_plus_one
        if unscaled and name.rsplit(".", 1)[-1] in ("q_norm", "k_norm"):
            return shapes[name][0] ** -0.25
        return 1.0

    return seeded(shapes, seed, lambda n, s: full_size_std(n, s) * qk(n),
                  mean=lambda n: init_mean(cfg, n) * qk(n))


def rms_norm(x, scale, eps, plus_one: bool = True):
    """RMSNorm over the last axis, times (1 + scale) (Gemma 1-3) or scale (Gemma 4, plus_one
    False); scale None: no scale (Gemma 4's V and router norms)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if scale is not None:
        w = scale.astype(jnp.float32)
        y = y * (1.0 + w if plus_one else w)
    return y.astype(x.dtype)


def norm(cfg: GemmaConfig, x, scale):
    return rms_norm(x, scale, cfg.norm_eps, cfg.norm_plus_one)


def rope(x, positions, base: float, scale: float, fraction: float = 1.0):
    """Rotate-half RoPE. x: [B, T, N, H]; positions: [T]. With fraction < 1 (Gemma 4's
    "proportional" RoPE) only the first fraction * H/2 pairs (i, i + H/2) rotate, at the
    frequencies they have over the full H; the other pairs keep frequency 0 (pass through)."""
    H = x.shape[-1]
    inv_freq = 1.0 / (base ** (np.arange(0, H, 2, dtype=np.float32) / H))          # [H/2]
    inv_freq[int(fraction * H // 2):] = 0.0
    angles = (positions.astype(jnp.float32) / scale)[:, None] * inv_freq[None, :]  # [T, H/2]
    sin = jnp.sin(angles)[None, :, None, :]                                        # [1, T, 1, H/2]
    cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def linear(x, w):
    """x [..., in] times w [in, out]. Spelled as jnp.matmul so that every exporter sees a plain
    matmul (jax2onnx emits MatMul for it, Einsum for the equivalent `@`)."""
    return jnp.matmul(x, w)


LORA_A, LORA_B = "_lora_a", "_lora_b"   # p[<matmul> + LORA_A]: a run-time low-rank slot


def project(x, p: dict, name: str):
    """x @ p[name], plus (x @ A) @ B where p holds a low-rank slot for that matmul
    (`runtime.contract.LoraSlot`: A [in, R], B [R, out], the adapter's scaling folded into B;
    zeros give the base model)."""
    y = linear(x, p[name])
    if name + LORA_A in p:
        y = y + linear(linear(x, p[name + LORA_A]), p[name + LORA_B])
    return y


class Forms:
    """How the model's parts that a target may store or compute otherwise are written; this base
    class is the float reference. A target subclasses it in its own module and hands an instance
    to `forward` (through `trace.signature_fn`); each hook gets the params dict the target's
    graph takes and returns what the reference does."""

    def attention_matmuls(self, rows: bool):
        """(scores_of(q [B, K, G*T, H], keys [B, K, S, H]) -> [B, K, G*T, S],
        mix(probs [B, K, G*T, S], values) -> [B, K, G*T, H]): batched matmuls over (B, K) with no
        operand transposed in memory. dot_general keeps the (B, K) batch dims, where jnp.matmul
        would squeeze the size-1 ones (a reshape of the cache) before TFLite's BATCH_MATMUL.
        Values are [B, K, S, H] in the `rows` cache form, else [B, K, H, S] (`compile.kv`)."""
        scores_of = lambda q_, k_: jax.lax.dot_general(q_, k_, (((3,), (3,)), ((0, 1), (0, 1))))
        if rows:
            mix = lambda p_, v_: jax.lax.dot_general(p_, v_, (((3,), (2,)), ((0, 1), (0, 1))))
        else:
            mix = lambda p_, v_: jax.lax.dot_general(p_, v_, (((3,), (3,)), ((0, 1), (0, 1))))
        return scores_of, mix

    def project(self, x, p: dict, name: str, layer: int):
        """Layer `layer`'s matmul `name` (q_proj ... down_proj) on x [..., in], with its run-time
        LoRA slot where p has one (`project`)."""
        return project(x, p, name)

    def logits(self, x, table):
        """The output projection: x [B, T, D] (after the final norm) -> [B, T, V] through the
        tied embedding table [V, D]."""
        return linear(x, table.T)

    def embed_rows(self, params: dict, tokens):
        """tokens [B, T] -> the tied embedding's rows [B, T, D], before the sqrt(D) scale."""
        return params["embed"][tokens]

    def ple_rows(self, params: dict, tokens):
        """tokens [B, T] -> Gemma 4's per-layer table rows [B, T, L*P], before their scale."""
        return params["ple_embed"][tokens]

    def experts(self, cfg: GemmaConfig, p: dict, h, w, idx, dtype):
        """Gemma 4's experts on h [B, T, D] (the MoE block's normed input) for the router's
        renormalised weights w and choices idx [B, T, k], each weight times its expert's scale.
        For a few tokens (T * k < E: decode) only the chosen experts' weights are gathered and
        read; for more (prefill) every expert runs densely and a [B, T, E] combine matrix (zero
        off the chosen k) mixes them, which reads each expert once."""
        E, k = cfg.num_experts, cfg.top_k_experts
        T = h.shape[1]
        w = (w * p["expert_scale"][idx]).astype(dtype)                            # [B, T, k]
        experts = (p["experts_gate"], p["experts_up"], p["experts_down"])
        if isinstance(T, int):
            return (_experts_gathered if T * k < E else _experts_dense)(h, idx, w, *experts)
        # a symbolic token count (the ONNX graph serves every length): choose at run time
        return jax.lax.cond(jnp.asarray(T) * k < E, _experts_gathered, _experts_dense,
                            h, idx, w, *experts)


REFERENCE = Forms()


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention(cfg: GemmaConfig, p: dict, layer: int, x, positions, cache, rows: bool = False,
              forms: Forms = REFERENCE, shared=None):
    """One attention block of layer `layer`. x: [B, T, D]. Returns (out [B, T, D], the updated
    caches (k, v) or None, the key segments it attended over): with `rows`, where `cache` is the
    read-only past, the cache output is only this call's new rows (`compile.kv`). A KV-shared
    layer (Gemma 4) gets its producer's segments as `shared` and computes no K or V."""
    B, T, _ = x.shape
    a = cfg.attention()[layer]
    local = a.kind == LOCAL
    N, K, H = cfg.num_heads, a.kv_heads, a.head_dim
    G = N // K
    base, scale, fraction = ((cfg.rope_base_local, 1.0, 1.0) if local else
                             (cfg.rope_base_global, cfg.rope_scale_global,
                              cfg.rope_fraction_global))
    q = forms.project(x, p, "q_proj", layer).reshape(B, T, N, H)                                # [B, T, N, H]
    if cfg.qk_norm:
        q = norm(cfg, q, p["q_norm"])
    q = rope(q, positions, base, scale, fraction) * cfg.query_scale
    if shared is None:
        k = forms.project(x, p, "k_proj", layer).reshape(B, T, K, H)                            # [B, T, K, H]
        # k_eq_v: the values are the keys' projection before its norm and RoPE
        v = k if a.k_eq_v else forms.project(x, p, "v_proj", layer).reshape(B, T, K, H)
        if cfg.qk_norm:
            k = norm(cfg, k, p["k_norm"])
        if cfg.v_norm:
            v = rms_norm(v, None, cfg.norm_eps)
        k = rope(k, positions, base, scale, fraction)
        form = ct.ROWS if rows else ct.FULL
        segments, new_cache = kv.segments(k, v, positions, cache, form, x.dtype)
    else:
        segments, new_cache = shared, None

    scores_of, mix = forms.attention_matmuls(rows)
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # [B, K, G*T, H]
    scores = []
    for keys, _, key_pos, visible in segments:
        sc = scores_of(qg, keys).reshape(B, K, G, T, -1)                           # [B, K, G, T, S]
        sc = _softcap(sc, cfg.attn_softcap)
        if local:
            # expand_dims, not [None, :]: jax2onnx cannot index a symbolic-length array that way
            visible &= (jnp.expand_dims(key_pos, 0) >
                        jnp.expand_dims(positions, 1) - cfg.sliding_window)         # [T, S]
        scores.append(jnp.where(visible, sc, jnp.finfo(sc.dtype).min))
    if len(scores) == 1:
        probs = jax.nn.softmax(scores[0].astype(jnp.float32), axis=-1).astype(x.dtype)
        out = mix(probs.reshape(B, K, G * T, -1), segments[0][1])                  # [B, K, G*T, H]
    else:
        # one softmax over all segments from a shared max and denominator: no concatenation of
        # scores (S + T) and no slicing of probabilities, neither of which jax2onnx traces
        # correctly with symbolic lengths
        scores = [sc.astype(jnp.float32) for sc in scores]
        top = functools.reduce(jnp.maximum, [sc.max(axis=-1, keepdims=True) for sc in scores])
        weights = [jnp.exp(sc - top) for sc in scores]                            # [B, K, G, T, S]
        total = functools.reduce(jnp.add, [w.sum(axis=-1, keepdims=True) for w in weights])
        out = functools.reduce(jnp.add, [
            mix((w / total).astype(x.dtype).reshape(B, K, G * T, -1), seg[1])
            for w, seg in zip(weights, segments)])                                 # [B, K, G*T, H]
    out = out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)                      # [B, T, K, G, H]
    return forms.project(out.reshape(B, T, N * H), p, "o_proj", layer), new_cache, segments  # [B, T, D]


def layer_params(params, i: int) -> dict:
    """Layer i's weights under their short names (q_proj, attn_norm, ...)."""
    prefix = f"layers.{i}."
    return {name[len(prefix):]: params[name] for name in params if name.startswith(prefix)}


def embed(cfg: GemmaConfig, params: dict, tokens, forms: Forms = REFERENCE):
    """tokens [B, T] -> scaled embeddings [B, T, D]."""
    x = forms.embed_rows(params, tokens)                                          # [B, T, D]
    return x * jnp.asarray(cfg.embed_scale, x.dtype)


def per_layer_inputs(cfg: GemmaConfig, params: dict, tokens, x, forms: Forms = REFERENCE):
    """Gemma 4's per-layer embeddings: tokens [B, T] and their scaled embeddings x [B, T, D] ->
    [B, T, L, P], the input of each layer's gated block. The token's row of the per-layer table
    (one gather: a token never needs other rows) mixed with a projection of x."""
    B, T, D = x.shape
    L, P = cfg.num_layers, cfg.ple_dim
    table_rows = forms.ple_rows(params, tokens)                                   # [B, T, L*P]
    rows = table_rows * jnp.asarray(P ** 0.5, x.dtype)                            # [B, T, L*P]
    proj = linear(x, params["ple_model_proj"]) * jnp.asarray(D ** -0.5, x.dtype)  # [B, T, L*P]
    proj = norm(cfg, proj.reshape(B, T, L, P), params["ple_proj_norm"])
    return (proj + rows.reshape(B, T, L, P)) * jnp.asarray(2 ** -0.5, x.dtype)    # [B, T, L, P]


def _top_k(x, k: int):
    """(values, indices) of the k largest along the last axis, ties to the lower index (as
    torch.topk on CPU and TFLite's ARG_MAX)."""
    return jax.lax.top_k(x, k)


def moe(cfg: GemmaConfig, p: dict, x, forms: Forms = REFERENCE):
    """Gemma 4's mixture of experts on x [B, T, D] (the residual stream before the FFN): router =
    fp32 softmax over all E experts, top k, renormalised, times each expert's scale; the experts
    run as `forms.experts` writes them."""
    D, k = x.shape[-1], cfg.top_k_experts
    r = rms_norm(x, None, cfg.norm_eps) * p["router_scale"] * jnp.asarray(D ** -0.5, x.dtype)
    probs = jax.nn.softmax(linear(r, p["router"]).astype(jnp.float32), axis=-1)   # [B, T, E]
    w, idx = _top_k(probs, k)                                                     # [B, T, k]
    w = w / w.sum(axis=-1, keepdims=True)
    h = norm(cfg, x, p["moe_norm"])                                               # [B, T, D]
    return forms.experts(cfg, p, h, w, idx, x.dtype)


def _experts_gathered(h, idx, w, gate, up, down):
    """Only the chosen experts' weights are read: h [B, T, D], idx/w [B, T, k]."""
    wg, wu, wd = gate[idx], up[idx], down[idx]                   # [B, T, k, D, I], [.., I, D]
    a = (jax.nn.gelu(jnp.einsum("btd,btkdi->btki", h, wg), approximate=True)
         * jnp.einsum("btd,btkdi->btki", h, wu))                               # [B, T, k, I]
    y = jnp.einsum("btki,btkid->btkd", a, wd)                                  # [B, T, k, D]
    return jnp.einsum("btkd,btk->btd", y, w)


def _experts_dense(h, idx, w, gate, up, down):
    """Every expert on every token, mixed by a [B, T, E] combine matrix (zero off the chosen
    k): each expert's weights are read once, whatever T."""
    E = gate.shape[0]
    combine = (jax.nn.one_hot(idx, E, dtype=h.dtype) * w[..., None]).sum(axis=2)  # [B, T, E]
    a = (jax.nn.gelu(jnp.einsum("btd,edi->btei", h, gate), approximate=True)
         * jnp.einsum("btd,edi->btei", h, up))                                 # [B, T, E, I]
    y = jnp.einsum("btei,eid->bted", a, down)                                  # [B, T, E, D]
    return jnp.einsum("bted,bte->btd", y, combine)


def block(cfg: GemmaConfig, p: dict, layer: int, x, positions, cache=None, rows: bool = False,
          forms: Forms = REFERENCE, shared=None, ple=None):
    """Decoder layer `layer` (attention + GeGLU FFN with Gemma's norms; Gemma 4: experts beside
    the FFN, the per-layer-embedding block with ple [B, T, P], the layer scalar) on x [B, T, D];
    returns (x, the layer's cache output or None, the key segments it attended over)."""
    h, layer_cache, segments = attention(cfg, p, layer, norm(cfg, x, p["attn_norm"]), positions,
                                         cache, rows=rows, forms=forms, shared=shared)
    if cfg.post_norms:
        h = norm(cfg, h, p["post_attn_norm"])
    x = x + h
    h = norm(cfg, x, p["ffn_norm"])
    gate = jax.nn.gelu(forms.project(h, p, "gate_proj", layer), approximate=True)
    h = gate * forms.project(h, p, "up_proj", layer)
    h = forms.project(h, p, "down_proj", layer)
    if cfg.num_experts:
        h = norm(cfg, h, p["post_mlp_norm"]) + norm(cfg, moe(cfg, p, x, forms),
                                                    p["post_moe_norm"])
    if cfg.post_norms:
        h = norm(cfg, h, p["post_ffn_norm"])
    x = x + h
    if cfg.ple_dim:
        g = jax.nn.gelu(linear(x, p["ple_gate"]), approximate=True) * ple          # [B, T, P]
        x = x + norm(cfg, linear(g, p["ple_proj"]), p["ple_norm"])
    if cfg.layer_scalar:
        x = x * p["layer_scalar"].astype(x.dtype)
    return x, layer_cache, segments


def head(cfg: GemmaConfig, final_norm, table, x, forms: Forms = REFERENCE):
    """x [B, T, D] -> logits [B, T, V] through the tied embedding, final softcap applied."""
    x = norm(cfg, x, final_norm)
    out = forms.logits(x, table)                                                   # [B, T, V]
    return _softcap(out.astype(jnp.float32), cfg.final_softcap)


def forward(cfg: GemmaConfig, params: dict, tokens, positions, cache: dict | None = None,
            logits="all", cache_outputs: str = "full", forms: Forms = REFERENCE):
    """tokens: [B, T] int32; positions: [T] int32 (contiguous); cache: the signature's KV dict.
    new_cache holds the updated caches, or for cache_outputs="rows" only this call's new rows,
    under the same names (`runtime.contract`).

    Returns (logits, new_cache): logits [B, T, V] for "all", [B, 1, V] for "last", [B, k, V] for an
    int k (the last k positions), [B, R, V] for an int32 array [R] of positions within the call,
    None for "none".
    """
    if cache_outputs not in ct.CACHE_OUTPUTS:
        raise ValueError(f"cache_outputs {cache_outputs!r}: expected one of {ct.CACHE_OUTPUTS}")
    layout = ct.KVLayout.of(cfg)
    x = embed(cfg, params, tokens, forms)
    ple = per_layer_inputs(cfg, params, tokens, x, forms) if cfg.ple_dim else None
    new_cache = {} if cache is not None else None
    segments = {}                 # producer layer -> the key segments it attended over
    for a in cfg.attention():
        i = a.layer
        x, layer_cache, segments[i] = block(
            cfg, layer_params(params, i), i, x, positions, kv.layer_input(cache, layout, i),
            rows=cache_outputs == "rows", forms=forms,
            shared=None if a.owner == i else segments[a.owner],
            ple=None if ple is None else ple[:, :, i])
        if cache is not None:
            kv.store(new_cache, layout, i, layer_cache)
    if isinstance(logits, str) and logits == "none":
        return None, new_cache
    if not isinstance(logits, (str, int)):                # rows chosen at run time
        x = jnp.take(x, logits, axis=1)                                      # [B, R, D]
    elif logits != "all":
        x = x[:, -(1 if logits == "last" else int(logits)):, :]
    return head(cfg, params["final_norm"], params["embed"], x, forms), new_cache

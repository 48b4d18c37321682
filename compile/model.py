"""The one JAX definition of the Gemma decoder (Gemma 1, 2 and 3 text models).

Parameters are a flat dict `name -> array` (names from `param_shapes`), so every checkpoint loader,
target and weight file shares one naming. Linear weights are stored [in, out] and applied as plain
2-D matmuls: every target lowers those to its fastest kernel (FULLY_CONNECTED, MatMul/MatMulNBits,
dot) without reshaping einsums.

The tied embedding is `embed` [V, D]. A target that quantizes may add `embed_q` (int8 [V, D]) and
`embed_scale` (float [V], or [V, D / b] per block of b inputs, with an optional `embed_bias` of the
same shape: row = scale * q + bias per block) for the lookup, keeping `embed` for the output projection only: the two
then live in separate buffers that its quantizer can treat independently.

`spelling` picks how attention's matmuls are written for the exporter: "xla" for every target that
lowers through StableHLO (xla, xla-tpu, and tflite, whose converter reads StableHLO), "onnx" for
jax2onnx, which lowers jnp.matmul to MatMul but dot_general to its slow generic Einsum. The two are
the same math; only the graph differs.

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


LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    """A matmul weight [in, out] (the tied embedding is not one: it is [V, D])."""
    return name.rsplit(".", 1)[-1] in LINEAR


def param_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    shapes = {"embed": (cfg.vocab_size, D), "final_norm": (D,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm": (D,),
            p + "q_proj": (D, N * H),
            p + "k_proj": (D, K * H),
            p + "v_proj": (D, K * H),
            p + "o_proj": (N * H, D),
            p + "ffn_norm": (D,),
            p + "gate_proj": (D, F),
            p + "up_proj": (D, F),
            p + "down_proj": (F, D),
        })
        if cfg.post_norms:
            shapes[p + "post_attn_norm"] = (D,)
            shapes[p + "post_ffn_norm"] = (D,)
        if cfg.qk_norm:
            shapes[p + "q_norm"] = (H,)
            shapes[p + "k_norm"] = (H,)
    return shapes


def init_params(cfg: GemmaConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights (for tiny test configs). Norm scales are random too, so (1 + w) is tested."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        out[name] = (rng.standard_normal(shape) * init_std(name, shape)).astype(dtype)
    return out


def init_std(name: str, shape: tuple) -> float:
    """Scale of random weights: norms 0.2, the embedding 1, a linear weight 1/sqrt(fan-in)."""
    return 0.2 if name.endswith("norm") else (1.0 if name == "embed" else shape[0] ** -0.5)


def full_size_std(name: str, shape: tuple) -> float:
    """Scale of random full-size weights (`random:VARIANT`, `compile.synthetic`): as `init_std`
    but the embedding 8/sqrt(D). The embedding sets two scales. The residual stream starts at
    std * sqrt(D) = 8, above what each layer adds (about 1), so a random network of many layers
    stays close to its input and quantization noise does not swing its top-1 at random (a
    unit-scale stream made random Gemma 3 1B int4 agree on only 63 % of clear positions). The
    tied output's logits are ~N(0, 8) for other tokens: with a unit-scale table they were
    ~N(0, sqrt(D)), which Gemma 2's final softcap (30) flattened together (random Gemma 2 2B: 0 of
    32 positions with a clear top-1, every export failed its parity check)."""
    return 8.0 * shape[1] ** -0.5 if name == "embed" else init_std(name, shape)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope(x, positions, base: float, scale: float):
    """Rotate-half RoPE. x: [B, T, N, H]; positions: [T]."""
    H = x.shape[-1]
    inv_freq = 1.0 / (base ** (np.arange(0, H, 2, dtype=np.float32) / H))          # [H/2]
    angles = (positions.astype(jnp.float32) / scale)[:, None] * inv_freq[None, :]  # [T, H/2]
    sin = jnp.sin(angles)[None, :, None, :]                                        # [1, T, 1, H/2]
    cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def linear(x, w):
    """x [..., in] times w [in, out]. Spelled as jnp.matmul so that every exporter sees a plain
    matmul (jax2onnx emits MatMul for it, Einsum for the equivalent `@`)."""
    return jnp.matmul(x, w)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention(cfg: GemmaConfig, p: dict, local: bool, x, positions, cache, rows: bool = False,
              spelling: str = "xla"):
    """One attention block. x: [B, T, D]. Returns (out [B, T, D], (k, v) or None): the updated
    caches; or with `rows`, where `cache` is the read-only past, only
    this call's new rows (`compile.kv`)."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    q = linear(x, p["q_proj"]).reshape(B, T, N, H)                                # [B, T, N, H]
    k = linear(x, p["k_proj"]).reshape(B, T, K, H)                                # [B, T, K, H]
    v = linear(x, p["v_proj"]).reshape(B, T, K, H)                                # [B, T, K, H]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    base, scale = ((cfg.rope_base_local, 1.0) if local
                   else (cfg.rope_base_global, cfg.rope_scale_global))
    q = rope(q, positions, base, scale) * cfg.query_scale
    k = rope(k, positions, base, scale)

    form = ct.ROWS if rows else ct.FULL
    segments, new_cache = kv.segments(k, v, positions, cache, form, x.dtype)

    # Attention as batched matmuls over (B, K) with no operand transposed in memory. jax2onnx
    # lowers jnp.matmul to MatMul (ORT fuses the transposed key operand away); for StableHLO,
    # dot_general keeps the (B, K) batch dims, where jnp.matmul would squeeze the size-1 ones
    # (a reshape of the cache) before TFLite's BATCH_MATMUL.
    if spelling == "onnx":
        assert rows, "the ONNX form keeps values [B, K, S, H] (cache outputs `rows`)"
        scores_of = lambda q_, k_: jnp.matmul(q_, jnp.swapaxes(k_, -1, -2))
        mix = jnp.matmul
    else:
        scores_of = lambda q_, k_: jax.lax.dot_general(q_, k_, (((3,), (3,)), ((0, 1), (0, 1))))
        if rows:
            mix = lambda p_, v_: jax.lax.dot_general(p_, v_, (((3,), (2,)), ((0, 1), (0, 1))))
        else:
            mix = lambda p_, v_: jax.lax.dot_general(p_, v_, (((3,), (3,)), ((0, 1), (0, 1))))
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
    return linear(out.reshape(B, T, N * H), p["o_proj"]), new_cache               # [B, T, D]


def layer_params(params, i: int) -> dict:
    """Layer i's weights under their short names (q_proj, attn_norm, ...)."""
    prefix = f"layers.{i}."
    return {name[len(prefix):]: params[name] for name in params if name.startswith(prefix)}


def embed(cfg: GemmaConfig, params: dict, tokens):
    """tokens [B, T] -> scaled embeddings [B, T, D]."""
    if "embed_q" in params:   # an integer lookup table (quantizing targets)
        q = params["embed_q"][tokens].astype(jnp.float32)                         # [B, T, D]
        scale = params["embed_scale"][tokens]                       # [B, T] or [B, T, D / b]
        if scale.ndim == q.ndim - 1:                                # one scale per row
            x = q * scale[..., None]
        else:                                                       # per block of b inputs
            B, T, D = q.shape
            nb = scale.shape[-1]
            x = q.reshape(B, T, nb, D // nb) * scale[..., None]
            if "embed_bias" in params:
                x = x + params["embed_bias"][tokens][..., None]
            x = x.reshape(B, T, D)
    else:
        x = params["embed"][tokens]                                                # [B, T, D]
    return x * jnp.asarray(cfg.embed_scale, x.dtype)


def block(cfg: GemmaConfig, p: dict, local: bool, x, positions, cache=None, rows: bool = False,
          spelling: str = "xla"):
    """One decoder layer (attention + GeGLU FFN with Gemma's norms) on x [B, T, D]; returns
    (x, the layer's cache output or None)."""
    h, layer_cache = attention(cfg, p, local, rms_norm(x, p["attn_norm"], cfg.norm_eps),
                               positions, cache, rows=rows, spelling=spelling)
    if cfg.post_norms:
        h = rms_norm(h, p["post_attn_norm"], cfg.norm_eps)
    x = x + h
    h = rms_norm(x, p["ffn_norm"], cfg.norm_eps)
    gate = jax.nn.gelu(linear(h, p["gate_proj"]), approximate=True)
    h = gate * linear(h, p["up_proj"])
    h = linear(h, p["down_proj"])
    if cfg.post_norms:
        h = rms_norm(h, p["post_ffn_norm"], cfg.norm_eps)
    return x + h, layer_cache


def head(cfg: GemmaConfig, final_norm, table, x):
    """x [B, T, D] -> logits [B, T, V] through the tied embedding, final softcap applied."""
    x = rms_norm(x, final_norm, cfg.norm_eps)
    out = linear(x, table.T)                                                       # [B, T, V]
    return _softcap(out.astype(jnp.float32), cfg.final_softcap)


def forward(cfg: GemmaConfig, params: dict, tokens, positions, cache: dict | None = None,
            logits: str | int = "all", cache_outputs: str = "full", spelling: str = "xla"):
    """tokens: [B, T] int32; positions: [T] int32 (contiguous); cache: the signature's KV dict.
    new_cache holds the updated caches, or for cache_outputs="rows" only this call's new rows,
    under the same names (`runtime.contract`).

    Returns (logits, new_cache): logits [B, T, V] for "all", [B, 1, V] for "last", [B, k, V] for an
    int k (the last k positions), None for "none".
    """
    if cache_outputs not in ct.CACHE_OUTPUTS or spelling not in ("xla", "onnx"):
        raise ValueError(f"cache_outputs {cache_outputs!r} / spelling {spelling!r}: expected one "
                         f"of {ct.CACHE_OUTPUTS} / ('xla', 'onnx')")
    layout = ct.KVLayout.of(cfg)
    x = embed(cfg, params, tokens)
    new_cache = {} if cache is not None else None
    for i in range(cfg.num_layers):
        x, layer_cache = block(cfg, layer_params(params, i), cfg.layer_type(i) == LOCAL, x,
                               positions, kv.layer_input(cache, layout, i),
                               rows=cache_outputs == "rows", spelling=spelling)
        if cache is not None:
            kv.store(new_cache, layout, i, layer_cache)
    if logits == "none":
        return None, new_cache
    if logits != "all":
        x = x[:, -(1 if logits == "last" else int(logits)):, :]
    return head(cfg, params["final_norm"], params["embed"], x), new_cache

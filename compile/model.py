"""The one JAX definition of the Gemma decoder (Gemma 1, 2 and 3 text models).

Parameters are a flat dict `name -> array` (names from `param_shapes`), so every checkpoint loader,
target and weight file shares one naming. Linear weights are stored [in, out] and applied as plain
2-D matmuls: every target lowers those to its fastest kernel (FULLY_CONNECTED, MatMul/MatMulNBits,
dot) without reshaping einsums.

The tied embedding is `embed` [V, D]. A target that quantizes may add `embed_q` (int8 [V, D]) and
`embed_scale` (float [V]) for the lookup, keeping `embed` for the output projection only: the two
then live in separate buffers that its quantizer can treat independently.

The KV cache is a plain value passed in and returned (layout in `signatures`). With `cache=None` the
model attends over the given tokens only: that full forward is the reference every cached path and
every artifact is checked against.

Shape letters: B batch, T tokens in this call, S cache length, N query heads, K KV heads,
G = N / K query heads per KV head, H head dim, D model dim, F FFN dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import signatures as sig
from .config import GemmaConfig, LOCAL


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
        std = 0.2 if name.endswith("norm") else (1.0 if name == "embed" else shape[0] ** -0.5)
        out[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return out


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


def attention(cfg: GemmaConfig, p: dict, i: int, x, positions, cache):
    """One attention block. x: [B, T, D]. Returns (out [B, T, D], (k_cache, v_cache) or None)."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    local = cfg.layer_type(i) == LOCAL
    q = linear(x, p["q_proj"]).reshape(B, T, N, H)                                 # [B, T, N, H]
    k = linear(x, p["k_proj"]).reshape(B, T, K, H)                                 # [B, T, K, H]
    v = linear(x, p["v_proj"]).reshape(B, T, K, H)                                 # [B, T, K, H]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    base, scale = ((cfg.rope_base_local, 1.0) if local
                   else (cfg.rope_base_global, cfg.rope_scale_global))
    q = rope(q, positions, base, scale) * cfg.query_scale
    k = rope(k, positions, base, scale)

    k_bksh = k.transpose(0, 2, 1, 3)                                               # [B, K, T, H]
    v_bkhs = v.transpose(0, 2, 3, 1)                                               # [B, K, H, T]
    if cache is None:
        keys, values, key_pos, new_cache = k_bksh, v_bkhs, positions, None
    else:
        k_cache, v_cache = cache                                # [B, K, S, H], [B, K, H, S]
        start = positions[0]
        zero = jnp.zeros((), jnp.int32)
        k_cache = jax.lax.dynamic_update_slice(
            k_cache, k_bksh.astype(k_cache.dtype), (zero, zero, start, zero))
        v_cache = jax.lax.dynamic_update_slice(
            v_cache, v_bkhs.astype(v_cache.dtype), (zero, zero, zero, start))
        keys, values = k_cache.astype(x.dtype), v_cache.astype(x.dtype)
        key_pos = jnp.arange(k_cache.shape[2], dtype=jnp.int32)                    # [S]
        new_cache = (k_cache, v_cache)

    qg = q.reshape(B, T, K, G, H)                                                  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, keys)                             # [B, K, G, T, S]
    scores = _softcap(scores, cfg.attn_softcap)
    visible = key_pos[None, :] <= positions[:, None]                               # [T, S]
    if local:
        visible &= key_pos[None, :] > positions[:, None] - cfg.sliding_window
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bkhs->btkgh", probs, values)                           # [B, T, K, G, H]
    return linear(out.reshape(B, T, N * H), p["o_proj"]), new_cache                # [B, T, D]


def forward(cfg: GemmaConfig, params: dict, tokens, positions, cache: dict | None = None,
            logits: str | int = "all"):
    """tokens: [B, T] int32; positions: [T] int32 (contiguous); cache: the signature's KV dict.

    Returns (logits, new_cache): logits [B, T, V] for "all", [B, 1, V] for "last", [B, k, V] for an
    int k (the last k positions), None for "none".
    """
    if "embed_q" in params:   # int8 lookup table with per-row scales (quantized TFLite artifacts)
        rows = params["embed_q"][tokens].astype(jnp.float32)                      # [B, T, D]
        x = rows * params["embed_scale"][tokens][..., None]
    else:
        x = params["embed"][tokens]                                                # [B, T, D]
    x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    new_cache = {} if cache is not None else None
    for i in range(cfg.num_layers):
        p = {name.split(".", 2)[2]: w for name, w in params.items()
             if name.startswith(f"layers.{i}.")}
        layer_cache = None if cache is None else (cache[sig.k_name(i)], cache[sig.v_name(i)])
        h, layer_cache = attention(cfg, p, i, rms_norm(x, p["attn_norm"], cfg.norm_eps),
                                   positions, layer_cache)
        if cfg.post_norms:
            h = rms_norm(h, p["post_attn_norm"], cfg.norm_eps)
        x = x + h
        h = rms_norm(x, p["ffn_norm"], cfg.norm_eps)
        h = jax.nn.gelu(linear(h, p["gate_proj"]), approximate=True) * linear(h, p["up_proj"])
        h = linear(h, p["down_proj"])
        if cfg.post_norms:
            h = rms_norm(h, p["post_ffn_norm"], cfg.norm_eps)
        x = x + h
        if cache is not None:
            new_cache[sig.k_name(i)], new_cache[sig.v_name(i)] = layer_cache
    if logits == "none":
        return None, new_cache
    if logits != "all":
        x = x[:, -(1 if logits == "last" else int(logits)):, :]
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    out = linear(x, params["embed"].T)                                             # [B, T, V]
    return _softcap(out.astype(jnp.float32), cfg.final_softcap), new_cache

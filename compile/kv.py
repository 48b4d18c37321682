"""How a traced graph takes and returns the KV cache (the compiler's side; the runtime's is
`runtime.kv`). Names, shapes and the two cache forms are `runtime.contract`'s; this module turns
them into the arrays a graph reads and the values it returns.

In the model, attention over the cache is a list of key segments, each
(keys [B, K, S, H], values, key positions [S], visible [T, S]): values are [B, K, S, H] in the
`rows` form and for the new keys of a full forward, [B, K, H, S] (transposed) in the full form.
  no cache   one segment: this call's keys (the reference full forward)
  full       one segment: the cache after this call's rows are written into it at input_pos
             (dynamic_update_slice); the updated cache is the output
  rows       two segments: the read-only past (the P slots just before input_pos[0], those that
             would precede position 0 masked) and this call's keys; only the new rows are output
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime import contract as ct


def layer_input(cache: dict | None, layout: ct.KVLayout, layer: int):
    """The (K, V) a layer reads from the signature's cache dict, or None without a cache."""
    if cache is None:
        return None
    owner = layout.owner(layer)
    return cache[owner.k], cache[owner.v]


def segments(k, v, positions, cache, form: str, dtype):
    """k, v: this call's keys (after RoPE) and values [B, T, K, H]; cache: the layer's (K, V) input
    or None. Returns (key segments, the layer's cache output or None)."""
    T = k.shape[1]
    k_new = k.transpose(0, 2, 1, 3)                                                # [B, K, T, H]
    # values as the form keeps them: [B, K, T, H] for rows, [B, K, H, T] for full
    v_new = v.transpose(0, 2, 1, 3) if form == ct.ROWS else v.transpose(0, 2, 3, 1)
    new_keys = (k_new, v_new, positions, positions[None, :] <= positions[:, None])
    if cache is None:
        return [new_keys], None
    if form == ct.ROWS:
        k_past, v_past = cache                                  # [B, K, P, H], [B, K, P, H]
        P = k_past.shape[2]
        # iota, not arange: under jax2onnx arange loses the symbolic P
        key_pos = positions[0] - P + jax.lax.broadcasted_iota(jnp.int32, (P,), 0)   # [P]
        old = jnp.broadcast_to(key_pos >= 0, (T, P))                               # [T, P]
        return ([(k_past.astype(dtype), v_past.astype(dtype), key_pos, old), new_keys],
                (k_new.astype(k_past.dtype), v_new.astype(v_past.dtype)))
    k_cache, v_cache = cache                                    # [B, K, S, H], [B, K, H, S]
    start = positions[0]
    zero = jnp.zeros((), jnp.int32)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k_new.astype(k_cache.dtype), (zero, zero, start, zero))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v_new.astype(v_cache.dtype), (zero, zero, zero, start))
    slot = jnp.arange(k_cache.shape[2], dtype=jnp.int32)                           # [S]
    return ([(k_cache.astype(dtype), v_cache.astype(dtype), slot,
              slot[None, :] <= positions[:, None])], (k_cache, v_cache))


def store(new_cache: dict, layout: ct.KVLayout, layer: int, output) -> None:
    """Puts a layer's cache output under the contract's names (nothing for a layer that owns no
    cache)."""
    for c in layout.caches:
        if c.layer == layer:
            new_cache[c.k], new_cache[c.v] = output


def trace_specs(layout: ct.KVLayout, form: str = ct.FULL, past=None) -> list:
    """jax.ShapeDtypeStructs of the cache inputs in signature order. For the `rows` form, `past`
    maps a layer's past_window to its symbolic past length (P for global layers, L for local)."""
    out = []
    for c in layout.caches:
        slots = layout.max_context if form == ct.FULL else past[c.past_window]
        for shape in c.shapes(slots, form):
            out.append(jax.ShapeDtypeStruct(shape, jnp.dtype(layout.dtype)))
    return out

"""Stored forms that more than one target hands to `model.forward` (`model.Forms`): the int8
lookup tables of quantizing targets. Each target's own forms (its attention spelling, its
experts) subclass this in the target's module.

The tied embedding's lookup may read `embed_q` (int8 [V, D]) with `embed_scale` (float [V], or
[V, D / b] per block of b inputs, with an optional `embed_bias` of the same shape: row = scale *
q + bias per block), leaving `embed` to the output projection only: the two then live in separate
buffers that the target's quantizer treats independently (`weights.quant`). Gemma 4's per-layer
table may be an int8 table in blocks, `ple_embed_q` with `ple_embed_scale`, or column parts
`ple_embed0_q`, `ple_embed1_q`, ... where a target splits it (no name ends in a digit: tflite's
tensor names could not be told apart): only the tokens' rows are read.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import model


def ple_table_parts(names) -> list[tuple[str, str]]:
    """The names (q, scale) of the int8 per-layer table's column parts among `names`, in order."""
    if "ple_embed_q" in names:
        return [("ple_embed_q", "ple_embed_scale")]
    out, c = [], 0
    while f"ple_embed{c}_q" in names:
        out.append((f"ple_embed{c}_q", f"ple_embed{c}_scale"))
        c += 1
    return out


class Lookups(model.Forms):
    """The reference, except that the lookups read the int8 tables among `names` (the weight
    names of the target's graph) where there are some."""

    def __init__(self, names):
        names = set(names)
        self.int8_embed = "embed_q" in names
        self.ple_parts = ple_table_parts(names)

    def embed_rows(self, params: dict, tokens):
        if not self.int8_embed:
            return super().embed_rows(params, tokens)
        q = params["embed_q"][tokens].astype(jnp.float32)                         # [B, T, D]
        scale = params["embed_scale"][tokens]                       # [B, T] or [B, T, D / b]
        if scale.ndim == q.ndim - 1:                                # one scale per row
            return q * scale[..., None]
        B, T, D = q.shape                                           # per block of b inputs
        nb = scale.shape[-1]
        x = q.reshape(B, T, nb, D // nb) * scale[..., None]
        if "embed_bias" in params:
            x = x + params["embed_bias"][tokens][..., None]
        return x.reshape(B, T, D)

    def ple_rows(self, params: dict, tokens):
        if not self.ple_parts:
            return super().ple_rows(params, tokens)
        B, T = tokens.shape
        rows = []
        for q_name, scale_name in self.ple_parts:   # column parts (tflite: each under 2^31 values)
            q = params[q_name][tokens].astype(jnp.float32)                         # [B, T, K]
            scale = params[scale_name][tokens]                                     # [B, T, K/b]
            nb = scale.shape[-1]
            rows.append((q.reshape(B, T, nb, -1) * scale[..., None]).reshape(B, T, -1))
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, -1)           # [B, T, L*P]

"""Tracing: each signature of the contract becomes one jitted function, exported once.

A signature function has the form `fn(weights, inputs) -> outputs`: `weights` is the flat params
dict (an argument, never closed over, so a target stores it once beside the graphs), `inputs` and
`outputs` are dicts keyed by the contract's tensor names (`runtime.contract`). `jax.export` traces it once into
StableHLO for every requested platform; every target lowers from these traced signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from runtime import contract as ct

from . import model

PLATFORMS = ("cpu", "cuda", "tpu")


@dataclass
class Traced:
    contract: ct.Contract
    signature: ct.Signature
    fn: Callable                    # fn(weights, inputs) -> outputs
    exported: jax.export.Exported


def signature_fn(contract: ct.Contract, signature: ct.Signature) -> Callable:
    cfg = contract.config
    kv_names = contract.kv.names
    decode = signature.kind == ct.DECODE

    def fn(weights, inputs):
        cache = {n: inputs[n] for n in kv_names}
        logits, cache = model.forward(cfg, weights, inputs[ct.TOKENS], inputs[ct.INPUT_POS],
                                      cache, logits="last" if decode else "none")
        out = dict(cache)
        if decode:
            out[ct.LOGITS] = logits.astype(jnp.float32)    # [B, 1, V]
        return out

    fn.__name__ = signature.name
    return fn


def specs(tensors) -> dict[str, jax.ShapeDtypeStruct]:
    return {t.name: jax.ShapeDtypeStruct(t.shape, jnp.dtype(t.dtype)) for t in tensors}


def weight_specs(params: dict) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}


def trace(contract: ct.Contract, params: dict, platforms=PLATFORMS, progress=None
          ) -> dict[str, Traced]:
    wspecs = weight_specs(params)
    sigs = contract.signatures()
    bar = progress(total=len(sigs), desc="trace+lower", unit="signature") if progress else None
    out = {}
    for s in sigs:
        fn = signature_fn(contract, s)
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(wspecs, specs(s.inputs))
        out[s.name] = Traced(contract, s, fn, exported)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return out


def reference_logits(contract: ct.Contract, params: dict, tokens: np.ndarray, last: int | None = None
                     ) -> np.ndarray:
    """The JAX model's full forward (no cache) over `tokens` [T]: logits [T, V], or [last, V] for
    the last positions only."""
    cfg = contract.config
    which = "all" if last is None else last
    f = jax.jit(lambda w, t: model.forward(cfg, w, t, jnp.arange(t.shape[1], dtype=jnp.int32),
                                           logits=which)[0])
    return np.asarray(f(params, jnp.asarray(tokens, jnp.int32)[None]))[0]

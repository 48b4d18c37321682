"""Tracing: each signature of the contract becomes one jitted function, exported once.

A signature function has the form `fn(weights, inputs) -> outputs`: `weights` is the flat params
dict (an argument, never closed over, so a target stores it once beside the graphs), `inputs` and
`outputs` are dicts keyed by the contract's tensor names (`runtime.contract`); a LoRA signature's
slot inputs join the params under the names `model.project` reads (`lora_params`). `jax.export`
traces it once into StableHLO for every requested platform; every target lowers from these traced
signatures.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from runtime import contract as ct

from . import model
from .weights import Params, take_rows

PLATFORMS = ("cpu", "cuda", "tpu")


@dataclass
class Traced:
    contract: ct.Contract
    signature: ct.Signature
    fn: Callable                    # fn(weights, inputs) -> outputs
    exported: jax.export.Exported | None   # None when no target asked for StableHLO


def signature_fn(contract: ct.Contract, signature: ct.Signature,
                 forms: model.Forms = model.REFERENCE) -> Callable:
    """The signature's function; `forms`: how the target's graph stores and computes the parts
    it writes otherwise (`model.Forms`; the reference by default)."""
    cfg = contract.config
    kv_names = contract.kv.names
    # decode: the last (only) position's logits; verify: every position's; prefill: none
    logits = {ct.DECODE: "last", ct.VERIFY: "all"}.get(signature.kind, "none")

    slots = contract.lora_slots() if signature.lora else ()

    def fn(weights, inputs):
        cache = {n: inputs[n] for n in kv_names}
        if slots:   # the run-time LoRA inputs, beside the matmuls they update (`model.project`)
            weights = {**weights, **lora_params(slots, inputs)}
        rows, cache = model.forward(cfg, weights, inputs[ct.TOKENS], inputs[ct.INPUT_POS],
                                    cache, logits=logits, forms=forms)
        out = dict(cache)
        if logits != "none":
            out[ct.LOGITS] = rows.astype(jnp.float32)    # [B, 1, V] decode, [B, N, V] verify
        return out

    fn.__name__ = signature.name
    return fn


def lora_params(slots, inputs) -> dict:
    """Slot inputs (`runtime.contract.LoraSlot` names) under the params names `model.project`
    reads: `layers.<i>.<target>_lora_a` / `_lora_b`."""
    out = {}
    for s in slots:
        name = f"layers.{s.layer}.{s.target}"
        out[name + model.LORA_A], out[name + model.LORA_B] = inputs[s.a_name], inputs[s.b_name]
    return out


def specs(tensors) -> dict[str, jax.ShapeDtypeStruct]:
    return {t.name: jax.ShapeDtypeStruct(t.shape, jnp.dtype(t.dtype)) for t in tensors}


def weight_specs(params) -> dict[str, jax.ShapeDtypeStruct]:
    """From shapes only: a lazy `weights.Params` is not read."""
    from .weights import specs_of
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in specs_of(params).items()}


def trace(contract: ct.Contract, params: dict, platforms=PLATFORMS, progress=None
          ) -> dict[str, Traced]:
    """Every signature's function, and its jax.export for `platforms` (from shapes only; nothing
    is exported when `platforms` is empty)."""
    wspecs = weight_specs(params)
    sigs = contract.signatures()
    bar = progress(total=len(sigs), desc="trace+lower", unit="signature") \
        if progress and platforms else None
    out = {}
    for s in sigs:
        fn = signature_fn(contract, s)
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(wspecs, specs(s.inputs)) \
            if platforms else None
        out[s.name] = Traced(contract, s, fn, exported)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return out


def reference_logits(contract: ct.Contract, params, tokens: np.ndarray, last: int | None = None
                     ) -> np.ndarray:
    """The JAX model's full forward (no cache) over `tokens` [T]: logits [T, V], or [last, V] for
    the last positions only. See `reference_logit_chunks`."""
    T = len(tokens)
    start = 0 if last is None else T - last
    return np.concatenate(list(reference_logit_chunks(contract, params, tokens, T, start)))


def reference_logit_chunks(contract: ct.Contract, params, tokens: np.ndarray, rows: int,
                           start: int = 0):
    """The full forward's logits for positions start..T-1 of `tokens` [T], yielded `rows`
    positions at a time ([r, V] each). It runs layer by layer, reading each layer's weights from
    `params` (a lazy `weights.Params` or a dict) just before using them, and the output
    projection a slice of the vocabulary at a time, so it holds at most the embedding table on
    the host and one layer (or one slice of the table) on the device: checking a large export
    does not need the whole float model. (Each row chunk reads the table again: a caller that
    can take columns, `reference_logit_slices`, reads it once.)"""
    x = run_layers(contract.config, params, np.asarray(tokens, np.int32)[None])    # [1, T, D]
    for r in range(start, x.shape[1], rows):
        yield np.concatenate([z for _, z in _head_slices(contract.config, params,
                                                         x[:, r:r + rows])], axis=-1)


def reference_logit_slices(contract: ct.Contract, params, tokens: np.ndarray):
    """The same logits as `reference_logit_chunks`, for all T positions a slice of the
    vocabulary at a time: (v0, [T, v1 - v0]) in order. The table is read (for a GGUF,
    dequantized) once, not once per row chunk."""
    x = run_layers(contract.config, params, np.asarray(tokens, np.int32)[None])    # [1, T, D]
    yield from _head_slices(contract.config, params, x)


def _head_slices(cfg, params, x):
    """(v0, logits [T, step]) of x [1, T, D] over the vocabulary in 64 MB slices of the table."""
    lazy = isinstance(params, Params) and params.tensors["embed"].rows is not None
    table = None if lazy else params["embed"]   # a source that reads only whole: once
    V, D = params.tensors["embed"].shape if lazy else table.shape
    norm = params["final_norm"]
    step = max(1, (64 << 20) // (D * 4))                                          # 64 MB slices
    for v in range(0, V, step):
        rows = params.tensors["embed"].get_rows(v, min(v + step, V)) if lazy else \
            table[v:v + step]
        yield v, np.asarray(_head(cfg, norm, rows, x))[0]


def run_layers(cfg, params, ids: np.ndarray, block=None):
    """The decoder layers of the full forward over ids [1, T]: the residual stream [1, T, D]
    after the last layer (before the final norm). Layer by layer, each layer's weights read from
    `params` just before use; `block(cfg, layer, p, x, positions, shared, ple) -> (x, segments)`
    runs one layer (default: the jitted reference, compiled once per `program_layer`;
    calibration passes one that records)."""
    return run_windows(cfg, params, [ids], block)[0]


def run_windows(cfg, params, windows: list[np.ndarray], block=None, after_layer=None
                ) -> list:
    """`run_layers` over several windows [1, T] at once, a layer at a time: each layer's weights
    are read once for all windows, and `after_layer(i)` runs when layer i has seen every window
    (calibration's per-layer statistics are then complete, and can be used and dropped before
    the next layer's)."""
    block = block or (lambda cfg, i, *args: _block(cfg, program_layer(cfg, i), *args))
    states = []   # per window: [x [1, T, D], positions, ple, {producer layer: key segments}]
    for ids in windows:
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32)
        # the lookup as model.embed does it (a row gather, then one float32 multiply); the
        # table is never whole in memory (31B's is 5.6 GB in float32): the tokens' rows, then
        # row slices
        x = jnp.asarray(take_rows(params, "embed", ids) * np.float32(cfg.embed_scale))
        ple = None
        if cfg.ple_dim:   # Gemma 4: only the tokens' rows of the per-layer table
            ple = _per_layer_inputs(cfg, {"ple_embed": take_rows(params, "ple_embed", ids[0]),
                                          "ple_model_proj": params["ple_model_proj"],
                                          "ple_proj_norm": params["ple_proj_norm"]},
                                    np.arange(ids.shape[1], dtype=np.int32)[None], x)
        states.append([x, positions, ple, {}])
    for a in cfg.attention():
        i = a.layer
        # each tensor onto the device as it is read, its host copy dropped at once: a 26B-A4B
        # layer's float expert stacks are 3 GB, held twice when the whole host dict was passed
        prefix = f"layers.{i}."
        p = {n[len(prefix):]: jnp.asarray(params[n]) for n in params if n.startswith(prefix)}
        for st in states:
            x, positions, ple, segments = st
            st[0], segments[i] = block(cfg, i, p, x, positions,
                                       None if a.owner == i else segments[a.owner],
                                       None if ple is None else ple[:, :, i])
        del p   # before the next layer's are read
        if after_layer:
            after_layer(i)
    return [st[0] for st in states]


def program_layer(cfg, i: int) -> int:
    """The first layer whose block is the same program as layer i's. `model.block` reads its
    layer index only through the layer's spec (`cfg.attention()`) and `Forms.project`, which the
    reference and the calibration's recorder do not use to choose a computation, so layers whose
    specs agree apart from their index (and whether they own their cache) compute the same
    function of their own weights: one compile serves them all (2 for the 270M's 18 layers,
    where a compile per layer took 5 of the quality gate's reference's 7 seconds)."""
    return _program_layers(cfg)[i]


@functools.lru_cache(maxsize=None)
def _program_layers(cfg) -> tuple[int, ...]:
    first: dict = {}
    return tuple(first.setdefault(dataclasses.replace(a, layer=0, owner=int(a.produces_kv)),
                                  a.layer) for a in cfg.attention())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block(cfg, layer, p, x, positions, shared, ple):
    x, _, segments = model.block(cfg, p, layer, x, positions, shared=shared, ple=ple)
    return x, segments


@functools.partial(jax.jit, static_argnums=0)
def _per_layer_inputs(cfg, params, tokens, x):
    return model.per_layer_inputs(cfg, params, tokens, x)


@functools.partial(jax.jit, static_argnums=0)
def _head(cfg, final_norm, table, x):
    """Logits of one slice of the vocabulary (the final softcap is elementwise)."""
    return model.head(cfg, final_norm, table, x)

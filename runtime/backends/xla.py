"""Runs the XLA artifact (jax.export StableHLO) with JAX on the default device (CPU, CUDA or TPU).

Weights are put on the device once; the KV cache stays on the device between calls and its input
buffers are donated, so XLA can update them in place rather than copy the cache every token.

Compiled executables go to JAX's persistent compilation cache, by default `xla/jax_cache/` beside
the artifact (or `$XDG_CACHE_HOME/gemma-aot/jax` when that is not writable, or `cache_dir`; False
turns it off), so a
second start loads them instead of compiling. JAX's cache setting is process-wide: the first
backend to set it wins for the process.
"""

from __future__ import annotations

import numpy as np

from .. import contract as ct
from .. import kv

TARGET = "xla"


def unsupported(record: dict, machine) -> str | None:
    platforms = record.get("platforms") or []
    if machine.platform not in platforms:
        return (f"exported for {', '.join(platforms)}; this machine's JAX platform is "
                f"{machine.platform}")
    return None


class JaxSignatures:
    """prefill/decode/verify over `_run(name, tokens [T] int32, start, state, lora) -> (outputs,
    state)`, shared by the JAX backends; with `lora` (slot inputs from `lora_inputs`) they run
    the LoRA signatures."""

    def prefill(self, signature, tokens, start, state, lora=None):
        name = signature if lora is None else ct.lora_name(signature)
        return self._run(name, np.asarray(tokens, np.int32), start, state, lora)[1]

    def decode(self, token, pos, state, lora=None):
        name = ct.DECODE if lora is None else ct.lora_name(ct.DECODE)
        out, state = self._run(name, np.array([token], np.int32), pos, state, lora)
        return np.asarray(out[ct.LOGITS][0, 0]), state

    def verify(self, signature, tokens, start, state, lora=None):
        """(logits [N, V] of each token, state) through `signature` (verify_N, N tokens)."""
        name = signature if lora is None else ct.lora_name(signature)
        out, state = self._run(name, np.asarray(tokens, np.int32), start, state, lora)
        return np.asarray(out[ct.LOGITS][0]), state


class XlaBackend(JaxSignatures):
    target = TARGET

    def __init__(self, manifest, record: dict, cache_dir: str | bool | None = None):
        from ..devices import quiet_jax
        quiet_jax()
        import jax
        import jax.numpy as jnp
        from jax import export

        self._jax, self._jnp = jax, jnp
        self.cache_dir = None if cache_dir is False else enable_compilation_cache(
            cache_dir or manifest.path(record["dir"]) / "jax_cache")
        from ..devices import query
        from ..manifest import ArtifactError
        files = record["files"]
        machine = query()
        self.platform = machine.platform
        why = unsupported(record, machine)
        if why:
            raise ArtifactError(f"cannot run the xla artifact here: {why}")
        self.weights = device_weights(manifest.path(files["weights"]["path"]),
                                      lambda name, a: jax.device_put(a))
        self._fns = {}
        for s in manifest.contract.signatures():
            exp = export.deserialize(bytearray(manifest.path(files[s.name]["path"]).read_bytes()))
            self._fns[s.name] = jax.jit(_with_inputs(exp), donate_argnums=(1,))
        self._kv = manifest.contract.kv

    def new_state(self):
        return kv.zeros(self._kv, alloc=self._jnp.zeros)

    def lora_inputs(self, arrays: dict):
        """The slot inputs on the device, once per (adapter, scale)."""
        return {k: self._jax.device_put(a) for k, a in arrays.items()}

    def _run(self, name, tokens, start, state, lora=None):
        jnp = self._jnp
        n = tokens.shape[0]
        out = self._fns[name](self.weights, state, jnp.asarray(tokens.reshape(1, n), jnp.int32),
                              jnp.arange(start, start + n, dtype=jnp.int32), lora or {})
        return out, {k: out[k] for k in self._kv.names}


def device_weights(path, put) -> dict:
    """The weights file placed on the device one tensor at a time by `put(name, array)`: the host
    holds one tensor beyond the device copies, not a second copy of the model. (On CPU the device
    copy is itself host memory: XLA does not use the mapped file in place.)"""
    from safetensors import SafetensorError, safe_open

    from ..manifest import ArtifactError
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
        out = {}
        for k in names:   # reopened per tensor: closing unmaps the pages just read from our RSS
            with safe_open(str(path), framework="numpy") as f:
                out[k] = put(k, f.get_tensor(k))
        return out
    except SafetensorError as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None


def enable_compilation_cache(preferred) -> str | None:
    import jax

    from .base import writable_dir
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    d = writable_dir(preferred, "jax")
    if d is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    # decode graphs compile in well under a second; cache them all
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(d)


def _with_inputs(exp):
    """Split the KV state from the per-call inputs so only the cache buffers are donated."""
    def call(weights, state, tokens, input_pos, lora):
        return exp.call(weights, {**state, **lora, ct.TOKENS: tokens, ct.INPUT_POS: input_pos})
    return call

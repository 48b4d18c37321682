"""XLA target: jax.export-serialized StableHLO per signature, for cpu, cuda and tpu.

Files: `weights.safetensors` (the flat params, stored once) and `{signature}.jaxexport` for each
signature. The exported functions take `(weights, inputs)` as traced, so the runtime feeds the
weights it loaded once to every signature. The modules run on any platform listed in the manifest;
JAX compiles them on load (deviceless TPU executables are a separate target).

`--quant int8` stores every projection and the tied embedding as int8 with per-channel scales
(`weights.int8_weights`) and re-exports the signatures for those weights: XLA fuses the int8->float
conversion into each dot, so a decoded token reads a quarter of the fp32 bytes.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jaxlib
from safetensors.numpy import save_file

from ..weights import int8_weights

NAME = "xla"
QUANTS = ("none", "int8")
DEFAULT_QUANT = "none"


def tolerance(options: dict) -> dict:
    if (options.get("quant") or DEFAULT_QUANT) == "int8":
        # quantized weights change logits by design; the check guards against broken graphs
        return {"max_rel_diff": 1.0, "min_top1": 0.9}
    # fp32 end to end: only summation order differs from the reference (max |diff| / max |logit|)
    return {"max_rel_diff": 2e-4, "min_top1": 1.0}


def _reexport(traced, params: dict) -> dict:
    """The traced signature functions exported again for other weights (dtypes or names)."""
    from ..trace import specs, weight_specs
    return {name: jax.export.export(jax.jit(t.fn), platforms=t.exported.platforms)(
                weight_specs(params), specs(t.signature.inputs))
            for name, t in traced.items()}


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    quant = options.get("quant") or DEFAULT_QUANT
    exported = {name: t.exported for name, t in traced.items()}
    if quant == "int8":
        params = int8_weights(params)
        exported = _reexport(traced, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"weights": "weights.safetensors"}
    bar = progress(total=len(traced) + 1, desc="write xla", unit="file") if progress else None
    save_file(dict(params), str(out_dir / files["weights"]))
    if bar:
        bar.update()
    platforms = None
    for name, exp in exported.items():
        (out_dir / f"{name}.jaxexport").write_bytes(exp.serialize())
        files[name] = f"{name}.jaxexport"
        platforms = list(exp.platforms)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return {"files": files, "platforms": platforms, "quantization": quant,
            "weights_dtype": "int8" if quant == "int8" else str(next(iter(params.values())).dtype),
            "weights_bytes": int(sum(v.nbytes for v in params.values())),
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "serialization": traced[next(iter(traced))].exported.calling_convention_version}}

"""XLA target: jax.export-serialized StableHLO per signature, for cpu, cuda and tpu.

Files: `weights.safetensors` (the flat params, stored once) and `{signature}.jaxexport` for each
signature. The exported functions take `(weights, inputs)` as traced, so the runtime feeds the
weights it loaded once to every signature. The modules run on any platform listed in the manifest;
JAX compiles them on load (deviceless TPU executables are a separate target).

XLA computes in float on CPU: `--quant native` (a block-quantized checkpoint's own values) stores
the checkpoint's dequantized values exactly, in float32, as `none` does; the manifest records each
tensor's source format.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jaxlib
from ..weights import float32_record, safetensors, specs_of

NAME = "xla"
QUANTS = ("none", "native")
ACTIVATIONS = ("float",)   # XLA computes every matmul in float
EXACT_QUANTS = ("none", "native")
DEFAULT_QUANT = "none"
TRACE_PLATFORMS = ("cpu", "cuda", "tpu")
LORA_SIGNATURES = True   # lora_* signatures are exported like the others (`{name}.jaxexport`)


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"weights": "weights.safetensors"}
    bar = progress(total=len(traced) + 1, desc="write xla", unit="file") if progress else None
    specs = specs_of(params)
    safetensors.write(out_dir / files["weights"], specs, params.__getitem__)   # tensor by tensor
    if bar:
        bar.update()
    platforms = None
    for name, t in traced.items():
        (out_dir / f"{name}.jaxexport").write_bytes(t.exported.serialize())
        files[name] = f"{name}.jaxexport"
        platforms = list(t.exported.platforms)
        if bar:
            bar.update()
    if bar:
        bar.close()
    quant = options.get("quant") or DEFAULT_QUANT
    formats = {n: float32_record(params, n) for n in specs}
    return {"files": files, "platforms": platforms, "quantization": quant,
            "tensor_formats": formats,
            "weights_dtype": str(next(iter(specs.values()))[1]),
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "serialization": traced[next(iter(traced))].exported.calling_convention_version}}

"""Backend registry and the choice of artifact.

`target="auto"` picks, among the artifacts the manifest lists whose backend imports here, the one
with the best measured decode speed recorded in the manifest (`benchmark.decode_tok_s`), else the
first in PREFERENCE order (their measured CPU decode speed on the default model: tflite int8/int4
~50-61 tok/s, onnx ~11, xla ~10).
"""

from __future__ import annotations

import importlib

from ..manifest import ArtifactError, Manifest

BACKENDS = {"xla": ("runtime.backends.xla", "XlaBackend"),
            "tflite": ("runtime.backends.tflite", "TfliteBackend"),
            "onnx": ("runtime.backends.onnx", "OnnxBackend")}
PREFERENCE = ("tflite", "onnx", "xla")   # without measurements: fastest measured on CPU first
_IMPORTS = {"xla": "jax", "tflite": "ai_edge_litert.interpreter", "onnx": "onnxruntime"}


def available(manifest: Manifest) -> dict[str, str | None]:
    """target -> None if it can run here, else the reason it cannot."""
    out = {}
    for target in manifest.artifacts:
        if target not in BACKENDS:
            out[target] = f"no runtime backend for target {target!r} in this version"
            continue
        try:
            importlib.import_module(_IMPORTS[target])
        except ImportError as e:
            out[target] = f"cannot import its backend: {e}"
            continue
        out[target] = None
    return out


def choose(manifest: Manifest, target: str = "auto") -> str:
    reasons = available(manifest)
    if target != "auto":
        manifest.artifact(target)   # raises if missing
        if reasons.get(target):
            raise ArtifactError(f"cannot run the {target!r} artifact here: {reasons[target]}")
        return target
    runnable = [t for t, why in reasons.items() if why is None]
    if not runnable:
        detail = "; ".join(f"{t}: {why}" for t, why in reasons.items()) or "no artifacts"
        raise ArtifactError(f"{manifest.root}: no artifact can run here ({detail})")
    measured = [t for t in runnable
                if manifest.artifact(t).get("benchmark", {}).get("decode_tok_s")]
    if measured:
        return max(measured, key=lambda t: manifest.artifact(t)["benchmark"]["decode_tok_s"])
    return min(runnable, key=lambda t: PREFERENCE.index(t) if t in PREFERENCE else len(PREFERENCE))


def open_backend(manifest: Manifest, target: str, **options):
    """Options a backend's constructor does not take (e.g. cache_dir for tflite) are ignored."""
    import inspect
    manifest.check_files(target)
    module, cls = BACKENDS[target]
    backend = getattr(importlib.import_module(module), cls)
    accepted = inspect.signature(backend.__init__).parameters
    return backend(manifest, manifest.artifact(target),
                   **{k: v for k, v in options.items() if k in accepted})

"""Backend registry and the choice of artifact.

An artifact can run here when the manifest lists it, this runtime has a backend for its target, the
backend's package imports, and the backend's `unsupported(record, machine)` finds nothing wrong
(e.g. an xla-tpu executable needs the same TPU topology and jax/jaxlib/libtpu versions it was
compiled with). `reasons()` says, for every artifact, why it cannot run here.

`target="auto"` then takes the first runnable artifact in this order:
  1. TPU visible to JAX: the xla-tpu executable (its topology and versions match), else the portable
     xla StableHLO compiled on the TPU.
  2. CUDA GPU visible to JAX: xla on the GPU.
  3. onnxruntime offers CUDAExecutionProvider (onnxruntime-gpu): onnx on CUDA.
  4. CPU: CPU_PREFERENCE: tflite, onnx, xla, xla-tpu (their decode speed on the default model,
     measured by `benchmarks.run` on a 2-core VM: tflite int8/int4 ~49-61 tok/s, onnx int4 ~53,
     xla ~9-11; xla-tpu on CPU exists only to test the sharded path).
`runtime.load` tries them in that order and falls back to the next when one fails to open (say an
executable the TPU runtime refuses), printing why.
"""

from __future__ import annotations

import importlib
import sys

from .. import devices as _devices
from ..manifest import ArtifactError, IntegrityFailure, Manifest

BACKENDS = {"xla": ("runtime.backends.xla", "XlaBackend"),
            "xla-tpu": ("runtime.backends.xla_tpu", "XlaTpuBackend"),
            "tflite": ("runtime.backends.tflite", "TfliteBackend"),
            "onnx": ("runtime.backends.onnx", "OnnxBackend")}
CPU_PREFERENCE = ("tflite", "onnx", "xla", "xla-tpu")
_IMPORTS = {"xla": "jax", "xla-tpu": "jax", "tflite": "ai_edge_litert.interpreter",
            "onnx": "onnxruntime"}
JAX_TARGETS = ("xla", "xla-tpu")


def _machine(targets) -> _devices.Machine:
    return _devices.query(jax=any(t in JAX_TARGETS for t in targets))


def _module(target: str):
    return importlib.import_module(BACKENDS[target][0])


def reasons(manifest: Manifest, machine: _devices.Machine | None = None,
            only: list[str] | None = None) -> dict[str, str | None]:
    """target -> None if it can run here, else the reason it cannot (for `only` these targets)."""
    targets = [t for t in manifest.artifacts if only is None or t in only]
    machine = machine or _machine(targets)
    out = {}
    for target in targets:
        record = manifest.artifacts[target]
        if target not in BACKENDS:
            out[target] = f"no runtime backend for target {target!r} in this version"
            continue
        try:
            importlib.import_module(_IMPORTS[target])
        except ImportError as e:
            out[target] = f"cannot import its backend: {e}"
            continue
        out[target] = _module(target).unsupported(record, machine)
    return out


def ranked(manifest: Manifest, machine: _devices.Machine | None = None) -> list[tuple[str, str]]:
    """The runnable artifacts in the order `auto` tries them, each with the rule that placed it."""
    machine = machine or _machine(manifest.artifacts)
    ok = [t for t, why in reasons(manifest, machine).items() if why is None]
    order: list[tuple[str, str]] = []

    def add(target, rule):
        if target in ok and target not in [t for t, _ in order]:
            order.append((target, rule))

    if machine.platform == "tpu":
        add("xla-tpu", "TPU present and the ahead-of-time executable matches it")
        add("xla", "TPU present: the portable StableHLO compiled on the TPU")
    if machine.platform == "cuda":
        add("xla", "CUDA GPU visible to JAX: StableHLO on the GPU")
    if "CUDAExecutionProvider" in machine.ort_providers:
        add("onnx", "onnxruntime has the CUDA execution provider")
    for t in sorted(ok, key=lambda t: CPU_PREFERENCE.index(t) if t in CPU_PREFERENCE
                    else len(CPU_PREFERENCE)):
        add(t, "CPU: default preference " + " > ".join(CPU_PREFERENCE))
    return order


def choose(manifest: Manifest, target: str = "auto",
           machine: _devices.Machine | None = None) -> str:
    return candidates(manifest, target, machine)[0]


def candidates(manifest: Manifest, target: str = "auto",
               machine: _devices.Machine | None = None) -> list[str]:
    """[target] if it was named and can run here, else the auto order; raises saying why not."""
    if target != "auto":
        manifest.artifact(target)   # raises if missing
        why = reasons(manifest, machine, only=[target]).get(target)
        if why:
            raise ArtifactError(f"cannot run the {target!r} artifact here: {why}")
        return [target]
    machine = machine or _machine(manifest.artifacts)
    order = [t for t, _ in ranked(manifest, machine)]
    if not order:
        detail = "; ".join(f"{t}: {why}" for t, why in reasons(manifest, machine).items())
        raise ArtifactError(f"{manifest.root}: no artifact can run here ({detail or 'no artifacts'})")
    return order


def open_backend(manifest: Manifest, target: str, verify: bool = True, log=None, **options):
    """Checks the artifact's files (sizes; with `verify`, the sha256 of those the backend reads:
    its `reads` roles, or all), then opens it. Options a
    backend's constructor does not take (e.g. cache_dir for onnx) are ignored."""
    import inspect
    backend = getattr(_module(target), BACKENDS[target][1])
    manifest.check_files(target, verify_hash=verify, log=log, roles=getattr(backend, "reads", None))
    accepted = inspect.signature(backend.__init__).parameters
    options = {**options, "verified": verify}   # xla-tpu: a seal vouches for checked files only
    return backend(manifest, manifest.artifact(target),
                   **{k: v for k, v in options.items() if k in accepted})


def open_first(manifest: Manifest, order: list[str], **options):
    """Opens the first of `order` that loads; a failure moves on to the next, said on stderr."""
    failures = []
    for target in order:
        try:
            return open_backend(manifest, target, **options)
        except Exception as e:
            if len(order) == 1 or isinstance(e, IntegrityFailure):
                raise
            failures.append(f"{target}: {e}")
            if target != order[-1]:
                print(f"gemma-aot: could not open the {target} artifact ({e}); falling back",
                      file=sys.stderr)
    raise ArtifactError(f"{manifest.root}: no artifact could be opened ({'; '.join(failures)})")

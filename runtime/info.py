"""`python -m runtime.info --artifacts DIR`: what this machine has, which artifacts can run here
(and why not), and which one `runtime.load(DIR)` would pick."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys


def machine() -> list[str]:
    lines = [f"machine: {platform.system()} {platform.machine()}, Python {platform.python_version()}"]
    try:
        import jax
        devs = ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
        lines.append(f"jax {jax.__version__}: default backend {jax.default_backend()} ({devs})")
    except Exception as e:   # an absent or broken install is information here, not a failure
        lines.append(f"jax: unavailable ({e})")
    try:
        import onnxruntime as ort
        lines.append(f"onnxruntime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    except Exception as e:
        lines.append(f"onnxruntime: unavailable ({e})")
    try:
        importlib.import_module("ai_edge_litert.compiled_model")
        from runtime.backends.base import physical_cores
        lines.append(f"ai-edge-litert: CPU (XNNPACK), {physical_cores()} physical cores")
    except Exception as e:
        lines.append(f"ai-edge-litert: unavailable ({e})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.info")
    p.add_argument("--artifacts", required=True)
    args = p.parse_args(argv)
    from . import backends
    from .manifest import ArtifactError, Manifest
    try:
        m = Manifest.read(args.artifacts)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(machine()))
    print(f"artifacts in {m.root} ({m.variant}):")
    for target, why in backends.available(m).items():
        a = m.artifact(target)
        size = sum(f["bytes"] for f in a["files"].values()) / 1e6
        parity = a.get("parity", {})
        status = "runnable" if why is None else f"not runnable: {why}"
        print(f"  {target:<8} {a.get('quantization', '?'):<5} {size:8.1f} MB  top-1 "
              f"{parity.get('top1_agreement', float('nan')):.0%}  {status}")
    try:
        print(f"choice: {backends.choose(m, 'auto')}  (runtime.load(DIR, target='auto'))")
    except ArtifactError as e:
        print(f"choice: none ({e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

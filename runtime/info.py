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
    from .devices import query
    print("\n".join(machine()))
    here = query()
    print(f"runs on: {here.describe()}; onnxruntime providers: "
          f"{', '.join(here.ort_providers) or 'none'}")
    print(f"artifacts in {m.root} ({m.variant}):")
    for target, why in backends.reasons(m, here).items():
        a = m.artifact(target)
        size = sum(f["bytes"] for f in a["files"].values()) / 1e6
        parity = a.get("parity", {})
        top1 = (f"top-1 {parity['top1_agreement']:.0%}" if "top1_agreement" in parity
                else "top-1  n/a")
        status = "runnable" if why is None else f"not runnable: {why}"
        print(f"  {target:<8} {a.get('quantization', '?'):<5} {size:8.1f} MB  {top1}  {status}")
    lora = m.data["signatures"].get("lora")
    if lora:
        names = m.data.get("adapters", {})
        print(f"LoRA slots: rank {lora['rank']} on {', '.join(lora['targets'])}; adapters: "
              + (", ".join(f"{n} (rank {a['rank']}, {', '.join(a['targets'])})"
                           for n, a in sorted(names.items())) or "none yet (python -m "
                 "compile.adapter PEFT_DIR --artifacts DIR)"))
    order = backends.ranked(m, here)
    if not order:
        print("choice: none (no artifact can run here)")
        return 1
    print(f"choice: {order[0][0]}  ({order[0][1]}; runtime.load(DIR, target='auto'))")
    if len(order) > 1:
        print(f"fallbacks, in order: {', '.join(t for t, _ in order[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

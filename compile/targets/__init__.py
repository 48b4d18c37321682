"""Export targets. Each target is one module exposing the same small interface:

    NAME: str                       the manifest key and the artifact's subdirectory
    QUANTS: tuple[str, ...]         the --quant values it supports; DEFAULT_QUANT is its default
    RECIPES: tuple[str, ...]        optional: the --recipe values it supports (`compile.recipes`;
                                    targets without ignore --recipe, `check_recipe`)
    ACTIVATIONS: tuple[str, ...]    optional: the --activations values it supports (what its
                                    quantized matmuls compute with); without it, none is accepted
    EXACT_QUANTS: tuple[str, ...]   optional (default ("none",)): the ones that store and compute
                                    the checkpoint's values in float32, judged as `none`
    TRACE_PLATFORMS: tuple[str, ...]  the platforms it needs each signature jax.export-ed for
                                    (empty: it lowers the traced functions itself)
                                    (the parity limits per quantization are `compile.parity`'s)
    def write(traced, params, out_dir, options, progress) -> dict
        lowers the traced signatures, writes files under out_dir, and returns the target-specific
        part of the manifest's artifact record ("files" maps roles to paths relative to out_dir).
    LORA_SIGNATURES: bool           optional (default False): it builds the contract's LoRA
                                    signatures (`--lora-rank`); export refuses others then
    def check_options(options) -> None   optional: raises ValueError for bad target options before
                                        any work is done
    def keeps_blocks(params, options) -> bool   optional, for targets with `native`: whether any
                                        tensor is stored in the checkpoint's blocks
    def check_checkpoint(params, options) -> None   optional: raises ValueError, naming the tensor,
                                        for a checkpoint these options cannot export, before any
                                        work is done

A target whose artifacts cannot run on the exporting machine (xla-tpu for a TPU topology) is
published with its parity check recorded as skipped and why.

Targets read `runtime.contract` for names, shapes and layouts, `compile.kv` for how a graph takes
the cache, and never import each other.
"""

from __future__ import annotations

import importlib

AVAILABLE = ("xla", "tflite", "onnx", "xla-tpu")
PORTABLE = ("xla", "tflite", "onnx")   # `--target all`: the ones that need no target options


def for_machine(machine=None) -> tuple[str, str]:
    """`--target auto`: (target, why) for the machine this runs on. A TPU or GPU that JAX sees
    runs the xla artifact (StableHLO compiled for it at load); on a CPU the onnx artifact keeps
    the checkpoint's quantized blocks and decodes fastest at llama.cpp's quality or better."""
    from runtime import devices
    machine = machine or devices.query()
    if machine.platform in ("tpu", "cuda", "rocm"):
        return "xla", f"JAX sees {machine.describe()}"
    if "CUDAExecutionProvider" in machine.ort_providers:
        return "onnx", "onnxruntime offers CUDA"
    return "onnx", "a CPU: onnx keeps the checkpoint's quantized blocks"


def get(name: str):
    if name not in AVAILABLE:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(AVAILABLE)}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def quant(mod, options: dict) -> str:
    """The weight quantization a target builds with these options."""
    return options.get("quant") or mod.DEFAULT_QUANT


def exact(mod, options: dict, params=None) -> bool:
    """Whether the artifact holds the checkpoint's values unchanged, in float32 (xla's `native`
    is the checkpoint's dequantized values; onnx's `native` of a float checkpoint is float): its
    parity is judged as `none` and it needs no quality gate."""
    q = quant(mod, options)
    if q in getattr(mod, "EXACT_QUANTS", ("none",)):
        return True
    return q == "native" and params is not None and hasattr(mod, "keeps_blocks") and \
        not mod.keeps_blocks(params, options)


def check_recipe(mods, options: dict) -> None:
    """--recipe applies to the targets that have recipes (tflite) among those exported, and is
    refused when none of them has: `--target all --recipe plain` makes a plain tflite."""
    recipe = options.get("recipe")
    if recipe and not any(recipe in getattr(m, "RECIPES", ()) for m in mods):
        raise ValueError(f"--recipe {recipe} applies to none of the targets asked for "
                         f"({', '.join(m.NAME for m in mods)}); recipes prepare weights for "
                         f"LiteRT's int8 kernels: the tflite target's int8 and int4")


def check_options(mod, options: dict) -> None:
    if hasattr(mod, "check_options"):
        mod.check_options(options)
    quant = options.get("quant") or mod.DEFAULT_QUANT
    if quant not in mod.QUANTS:
        raise ValueError(f"target {mod.NAME!r} does not support --quant {quant}; "
                         f"it supports: {', '.join(mod.QUANTS)}")
    acts = options.get("activations")
    if acts and acts not in getattr(mod, "ACTIVATIONS", ()):
        choice = getattr(mod, "ACTIVATIONS", ())
        raise ValueError(f"target {mod.NAME!r} does not support --activations {acts}; " + (
            f"it supports: {', '.join(choice)}" if choice else
            "its matmuls' activations are fixed by --quant (float for none and for xla; "
            "tflite's quantized kernels quantize them to int8)"))

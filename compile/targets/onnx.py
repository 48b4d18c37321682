"""ONNX target for ONNX Runtime (CPU and CUDA): one `model.onnx` serving every signature.

The model function is the same one every target traces, lowered with jax2onnx, but with the token
dimension T symbolic (bounded by the max context) instead of one static graph per signature: ORT's
Python API cannot share weights (or their pre-packed forms) between sessions, so one graph that
runs any prefill length and the one-token decode keeps the weights stored and resident once. Inputs
and outputs carry the contract's names. Cache outputs are `rows` (`runtime.contract`): the cache
inputs are read-only and each call returns only its new K/V rows (`{name}_new`), which the runtime
writes into its cache buffers. With `--lora-rank R` the graph also takes the contract's LoRA slot inputs
(A [in, R], B [R, out] per slotted matmul): the one graph serves the base signatures (the runtime
feeds zero slots, prepared once) and the `lora_*` ones. An ONNX graph cannot alias an output to an input, so returning whole
updated caches made ORT copy every layer's cache on every decoded token (ScatterND).

Export, streamed: jax2onnx traces the model with every weight a graph input (from shapes only:
the graph it writes holds no weight); `weights.onnx.finish` then turns each weight input into an
external-data initializer (`model.onnx.data`), reading, transforming and quantizing one checkpoint
tensor at a time, and replaces each quantized matmul by MatMulNBits (`int4`: 4 bits, `int8`: 8
bits; `mixed`: 8 for the embedding/output, v and down, asymmetric 4 for the rest; blocks of 32
inputs, float32 scales, least-error for 8 bits, asymmetric where that halves a tensor's error
(`int8_blocks`), accuracy level 4 — activations quantized to
int8 per block; `--activations float`: level 1, float32 activations, 8-bit blocks as two 4-bit
halves, exact products of the stored weights at a cost in speed). `native` keeps a GGUF checkpoint's own blocks instead (`weights.gguf_blocks`:
every value as llama.cpp stores it; a type it cannot keep is refused by name), float tensors
stay float. The tied embedding's lookup reads an int8 copy when quantizing (`embed_q` with per-block
`embed_scale`: int8 blocks of 32, the projection's own with `int8`; with `native` the checkpoint's
own blocks, with their biases), its output projection is quantized on the table's rows.

Gemma 4's experts (`weights.split_experts`): each expert's three matmuls are separate weights,
quantized like the dense FFN's, inside one If per expert that runs only when a token chose it, so
a decode step reads the chosen k experts' MatMulNBits blocks and no other expert's (ORT has no
dequantizing matmul for a gathered weight, and its QMoE op has no gated GELU). Its per-layer
embedding table is an int8 lookup (`ple_embed_q`, blocks of 32), read a row per token. The
router stays float32 (`model.keeps_float`). These stored forms, and attention written as
jnp.matmul, reach the model through this module's `Forms` (`model.Forms`), which `lower` hands
to `model.forward`.

Before the weights are attached, `onnx_graph.simplify` turns the run-time shape arithmetic that
jax2onnx writes for symbolic dimensions into constants, fuses the RMS norms and computes repeated
subexpressions once (the RoPE tables and masks each layer rebuilt): a decode step ran ~6,300
nodes, now ~2,060. The runtime's session applies ORT's own optimizations when
it loads (folding `1 + w` of the norms, and the output projection's Transpose for fp32 artifacts),
and models past the 2 GB protobuf limit need nothing
special because no weight is inside the protobuf.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from runtime import contract as ct

from .. import kv
from .. import model as gemma
from ..weights import (FLOAT_FORMATS, Params, float32_record, format_of, nbytes_of, specs_of,
                       split_experts)
from ..weights import gguf_blocks
from ..weights import onnx as container
from ..weights import quant as wq
from . import onnx_graph
from .forms import Lookups

NAME = "onnx"
QUANTS = ("none", "native", "int8", "int4", "mixed")
# what quantized matmuls compute with: int8 activations per block (ORT's accuracy level 4, its
# fastest kernels) or float32 (level 1: the stored weights' exact products, 8-bit blocks as two
# 4-bit halves; slower, see `weights.onnx`)
ACTIVATIONS = ("int8", "float")
DEFAULT_ACTIVATIONS = "int8"
DEFAULT_QUANT = "native"   # a GGUF checkpoint's own blocks; a float checkpoint stays float32
TRACE_PLATFORMS = ()   # jax2onnx lowers the model function with symbolic lengths itself
DATA_FILE = "model.onnx.data"


BITS = {"int4": 4, "int8": 8}
BLOCK = 32
# `mixed`: int8 for the tied embedding/output (63 % of the 270M's weights; every logit reads it)
# and the projections llama.cpp's Q4_K_M also gives more bits (v, down); asymmetric int4 (a
# scale and a bias per block, llama.cpp's Q4_1 form) for the rest
MIXED_INT8 = ("embed", "v_proj", "down_proj")


ASYM_GAIN = 0.5   # an 8-bit tensor takes asymmetric blocks when they halve its squared error


LORA_SIGNATURES = True   # the one graph takes the slots too (the runtime feeds zeros for the base)


def int8_blocks(rows: np.ndarray, source: str, asymmetric_ok: bool = True) -> "wq.Blocks":
    """int8 blocks of rows [N, K], least-error scales: symmetric, or (when `asymmetric_ok`)
    asymmetric (a bias per block: one more small matmul) when that halves the tensor's squared
    error, as it does for values that lie on an offset grid (a dequantized Q4_K/Q4_1 tensor)."""
    q, scale = wq.int_blocks(rows, 8, BLOCK, search=True)
    sym = wq.Blocks(8, BLOCK, q, scale, source=source)
    del q, scale
    if not asymmetric_ok:
        return sym
    asym = wq.int_blocks_asym(rows, 8, BLOCK, source=source, search=True)
    err = [float(np.sum((b.dequantize() - rows) ** 2)) for b in (sym, asym)]
    return asym if err[1] < ASYM_GAIN * err[0] else sym


def recipe(name: str, quant: str) -> tuple[int, bool]:
    """(bits, asymmetric) of a quantized tensor under int8 / int4 / mixed."""
    if quant == "mixed":
        if name.rsplit(".", 1)[-1] in MIXED_INT8:
            return 8, False
        return 4, True
    return BITS[quant], False


def _native_layout(params, name: str):
    """(bits, block, has a bias) of a tensor kept in its checkpoint's blocks, None for a float one;
    a block type this target cannot store raises, naming the tensor, its type and the targets that
    can."""
    fmt = format_of(params, name)
    if fmt in FLOAT_FORMATS:
        return None
    lay = gguf_blocks.layout(fmt)
    if lay is None:
        raise ValueError(f"--quant native: tensor {name} is stored as {fmt}, which the onnx "
                         f"target cannot keep (it keeps {', '.join(gguf_blocks.SUPPORTED)}); "
                         f"targets that can take it: xla (as float32); or re-quantize with "
                         f"--quant int8 or int4")
    return lay


MERGED_QUANT = "int8"   # `native`: a block weight a LoRA adapter changed takes this recipe


def _own_quant(params, name: str, quant: str) -> str:
    """The recipe of one tensor: `native` keeps a checkpoint's blocks, except for block weights a
    LoRA adapter changed (`Params.merged`), which are float now and take the float recipe; a
    merged weight of a float checkpoint stays float, like the rest of it."""
    was = getattr(params, "merged", {}).get(name)
    if quant == "native" and was is not None and was not in FLOAT_FORMATS:
        return MERGED_QUANT
    return quant


def quantized(params, name: str, quant: str, float_embedding: bool) -> bool:
    """Whether `name` reaches the graph as Blocks (a MatMulNBits weight)."""
    if not (gemma.is_linear(name) or (name == "embed" and not float_embedding)) \
            or gemma.keeps_float(name):
        return False
    # one tensor's shape, not specs_of(params): this runs per tensor (12,117 for 26B-A4B)
    shape = (params.tensors[name].shape if isinstance(params, Params)
             else np.shape(params[name])) if name in params else None
    if shape is not None and gemma.is_linear(name) and shape[0] % BLOCK:
        return False   # inputs that do not fill a block (a tiny model's 8-wide PLE) stay float
    quant = _own_quant(params, name, quant)
    if quant == "native":
        return _native_layout(params, name) is not None
    return quant != "none"


def check_checkpoint(params, options: dict) -> None:
    """Before any work: with `native`, every block-quantized tensor is one this target keeps."""
    params = split_experts(params)
    quant = options.get("quant") or DEFAULT_QUANT
    if quant == "native":
        for name in params:
            quantized(params, name, quant, bool(options.get("float_embedding")))


def keeps_blocks(params, options: dict) -> bool:
    quant = options.get("quant") or DEFAULT_QUANT
    fe = bool(options.get("float_embedding"))
    return quant == "native" and any(quantized(params, n, quant, fe) for n in params)


def quantized_table(params, quant: str) -> bool:
    """Gemma 4's per-layer embedding table is stored as int8 blocks (`ple_embed_q`, one scale per
    BLOCK values) whenever the artifact quantizes: the lookup reads T rows of it per call.
    `native` keeps a float table float (a float checkpoint's native artifact is exact)."""
    if "ple_embed" not in params or quant == "none":
        return False
    return not (quant == "native" and format_of(params, "ple_embed") in FLOAT_FORMATS)


def weight_specs(params, quant: str, float_embedding: bool) -> dict[str, tuple]:
    """name -> (shape, dtype) of the graph's weight inputs, from shapes only."""
    specs = dict(specs_of(params))
    if quantized_table(params, quant):
        V, LP = specs.pop("ple_embed")[0]
        specs["ple_embed_q"] = ((V, LP), np.dtype(np.int8))
        specs["ple_embed_scale"] = ((V, LP // wq.table_block(LP, BLOCK)), np.dtype(np.float32))
    if quantized(params, "embed", quant, float_embedding):
        V, D = specs["embed"][0]
        specs["embed_q"] = ((V, D), np.dtype(np.int8))
        if quant == "native":   # the checkpoint's own blocks serve the lookup too
            _, block, bias = _native_layout(params, "embed")
            specs["embed_scale"] = ((V, D // block), np.dtype(np.float32))
            if bias:
                specs["embed_bias"] = ((V, D // block), np.dtype(np.float32))
        else:   # int8 blocks of BLOCK (the projection's own when it is int8)
            specs["embed_scale"] = ((V, D // BLOCK), np.dtype(np.float32))
    return specs


class Forms(Lookups):
    """What this target hands `model.forward`: the int8 lookups among its weight names; attention
    as jnp.matmul (jax2onnx lowers it to MatMul, but dot_general to its slow generic Einsum; ORT
    fuses the transposed key operand away); each expert as its own matmul weights in a branch
    (`weights.split_experts`). The same math as the reference, another graph."""

    def attention_matmuls(self, rows: bool):
        assert rows, "the ONNX form keeps values [B, K, S, H] (cache outputs `rows`)"
        return (lambda q_, k_: jnp.matmul(q_, jnp.swapaxes(k_, -1, -2))), jnp.matmul

    def experts(self, cfg, p, h, w, idx, dtype):
        w = (w * p["expert_scale"][idx]).astype(dtype)                            # [B, T, k]
        return experts_branches(h, idx, w, p, cfg.num_experts)


def experts_branches(h, idx, w, p, E: int):
    """One conditional branch per expert, over its own matmul weights (`weights.split_experts`:
    ONNX stores each expert as quantized matmuls, which a gather could not read): an expert no
    token chose is skipped, so a decode step reads only the chosen k experts' weights; a chosen
    one runs on every token, weighted by its [B, T] column of the combine matrix (zero where the
    token did not choose it)."""
    hot = jax.nn.one_hot(idx, E, dtype=h.dtype)                                # [B, T, k, E]
    combine = (hot * w[..., None]).sum(axis=2)                                   # [B, T, E]
    chosen = hot.sum(axis=(0, 1, 2)) > 0                                         # [E]

    def expert(e):
        def run(h, c):
            a = (jax.nn.gelu(gemma.linear(h, p[f"expert{e}.gate_proj"]), approximate=True)
                 * gemma.linear(h, p[f"expert{e}.up_proj"]))                         # [B, T, I]
            return gemma.linear(a, p[f"expert{e}.down_proj"]) * c[..., None]         # [B, T, D]
        return run

    outs = [jax.lax.cond(chosen[e], expert(e), lambda h, c: jnp.zeros_like(h), h,
                         combine[..., e]) for e in range(E)]
    return functools.reduce(jnp.add, outs)


def lower(contract: ct.Contract, wspecs: dict, path: Path) -> None:
    """jax2onnx with the token and past dimensions symbolic and every weight an input named as
    in `wspecs`; writes path."""
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    from ..trace import lora_params
    cfg = contract.config
    layout = contract.kv
    names_kv = layout.names
    wnames = sorted(wspecs)
    slots, lora = contract.lora_slots(), contract.lora_specs()
    nw = len(names_kv) + len(wnames)
    forms = Forms(wnames)

    def fn(tokens, input_pos, *rest):
        cache, weights = rest[:len(names_kv)], dict(zip(wnames, rest[len(names_kv):nw]))
        if slots:   # the run-time LoRA inputs (zeros: the base model)
            weights.update(lora_params(slots, dict(zip([t.name for t in lora], rest[nw:-1]))))
        # the positions whose logits are returned (`logit_index` [R]): the last for prefill
        # and decode, every one for a verify call
        logits, new = gemma.forward(cfg, weights, tokens, input_pos, dict(zip(names_kv, cache)),
                                    logits=rest[-1], cache_outputs=ct.ROWS, forms=forms)
        return (logits.astype(jnp.float32),) + tuple(new[n] for n in names_kv)

    S = contract.max_context
    windows = {c.past_window for c in layout.caches}
    local = sorted(windows - {None})
    assert len(local) <= 1, local
    # symbolic dims: T new tokens, P past slots of global layers, L of local ones (only those
    # used: jax.export refuses a dim that no input has)
    names = ["T", "R"] + (["P"] if None in windows else []) + (["L"] if local else [])
    bounds = {"T": S, "R": S, "P": S, "L": min(local[0], S) if local else S}
    dims = dict(zip(names, jax.export.symbolic_shape(
        ", ".join(names), constraints=tuple(f"{n} <= {bounds[n]}" for n in names))))
    T = dims["T"]
    specs = [jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32)]
    specs += kv.trace_specs(layout, ct.ROWS, {w: dims["P"] if w is None else dims["L"]
                                              for w in windows})
    specs += [jax.ShapeDtypeStruct(*wspecs[k]) for k in wnames]
    specs += [jax.ShapeDtypeStruct(t.shape, jnp.dtype(t.dtype)) for t in lora]
    specs += [jax.ShapeDtypeStruct((dims["R"],), jnp.int32)]
    _import_jax_plugins()
    with _scalable_jax2onnx(light=bool(cfg.num_experts)), _quiet_serializer():
        to_onnx(fn, specs, model_name=cfg.name, return_mode="file", output_path=str(path),
                input_names=[ct.TOKENS, ct.INPUT_POS] + list(names_kv) + wnames
                + [t.name for t in lora] + [ct.LOGIT_INDEX],
                output_names=[ct.LOGITS] + [ct.rows_name(n) for n in names_kv])


def _import_jax_plugins() -> None:
    """jax2onnx imports every plugin module it ships on its first conversion in a process,
    including the equinox, flax and example trees, whose import builds and compiles example
    modules (~7 s, and a libtpu probe that logs an error on machines without a TPU). Our graphs
    are JAX primitives and jax.numpy only: import the `jax` tree (~1.3 s) and mark the discovery
    done. Only where jax2onnx's discovery is the one this was written for (0.17), else its own."""
    import importlib
    import pathlib
    from jax2onnx.plugins import plugin_system as ps
    if getattr(ps, "_already_imported_plugins", None) is not False or \
            not callable(getattr(ps, "_import_tree", None)):
        return
    root = pathlib.Path(ps.__file__).parent
    for helper in sorted(root.glob("_*.py")):   # shared helpers the jax plugins import
        importlib.import_module(f"jax2onnx.plugins.{helper.stem}")
    ps._import_tree(root / "jax", "jax2onnx.plugins.jax")
    ps._already_imported_plugins = True


@contextlib.contextmanager
def _quiet_serializer():
    """onnx_ir's serializer warns once per value whose element type jax2onnx left unset (the
    shape constants it makes for symbolic dimensions: ~150 lines for a tiny model, ~380 for the
    270M) although ORT infers them; those warnings hide what the export says, so they are
    dropped while jax2onnx writes. ORT's load and the parity run check the graph."""
    import logging
    log = logging.getLogger("onnx_ir.serde")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# jax2onnx's graph passes kept for a graph with expert branches; its others (cast folding, shape
# propagation, transpose and reshape rewrites) scan the graph per node they visit, hours on
# 3,840 branches. `onnx_graph.simplify` and ORT's own optimizer do the clean-up that matters.
LIGHT_PASSES = ("name_fix", "lift_constants_to_initializers", "prune_unused_graph_inputs")
# passes for ops a Gemma graph never has (ConvTranspose, Dropout, Sigmoid): each still walks the
# whole graph, the ConvTranspose one ~3 s of the 270M's export, and finds nothing to change
NO_OP_PASSES = ("fold_conv_transpose_constant_bias", "inline_dropout_training_mode_constants",
                "rewrite_mul_sigmoid_as_swish")


@contextlib.contextmanager
def _scalable_jax2onnx(light: bool = False):
    """Two of jax2onnx's checks scan the whole graph per call, quadratic in its size, which
    stalled a 26B-A4B trace (11,520 expert weight inputs, 3,840 If branches) for over ten
    minutes each:
    - after every equation, whether its outputs are connected (a scan of all inputs,
      initializers and nodes): a value with a producing node, a graph input or an initializer
      is connected, which onnx_ir answers directly; anything else still takes the scan;
    - when it folds a Cast pair, whether any branch reads the intermediate value (a scan of
      every branch): answered "yes", the conservative answer, so the first Cast stays (our
      `onnx_graph.simplify` drops it when nothing reads it).
    With `light` (a model with experts) only LIGHT_PASSES of its optimizer run; NO_OP_PASSES
    never run (the 270M's graph is the same bytes without them; tests/test_onnx.py checks
    that no op they rewrite is in a Gemma graph).
    ORT's load and the parity check verify the graph afterwards."""
    from jax2onnx.converter import ir_optimizations as io, output_binding as ob
    slow, nested = ob._value_is_graph_connected, io._nested_graph_references_value
    passes = io._OPTIMIZER_PASSES
    io._OPTIMIZER_PASSES = tuple(p for p in passes if p.name not in NO_OP_PASSES
                                 and (p.name in LIGHT_PASSES or not light))

    def fast(ctx, value):
        if value.producer() is not None or value.is_graph_input() or value.is_initializer():
            return True
        return slow(ctx, value)
    ob._value_is_graph_connected = fast
    io._nested_graph_references_value = lambda nodes, value: True
    try:
        yield
    finally:
        ob._value_is_graph_connected, io._nested_graph_references_value = slow, nested
        io._OPTIMIZER_PASSES = passes


def weight_stream(params, quant: str, float_embedding: bool, chosen: dict | None = None,
                  tick=None):
    """(name, array or quant.Blocks) for every graph weight, one checkpoint tensor read at a
    time: matmul weights as Blocks over their rows ([out, in]) — the checkpoint's own (`native`)
    or our quantizer's — and the embedding's lookup copy beside its quantized projection.
    `chosen` records, per quantized tensor, whether its blocks are asymmetric; `tick` is called
    once per checkpoint tensor (a progress bar's total is len(params))."""
    for name in params:
        yield from _tensor_stream(params, name, quant, float_embedding, chosen)
        if tick:
            tick()


def _tensor_stream(params, name: str, quant: str, float_embedding: bool, chosen):
    """weight_stream's graph weights for one checkpoint tensor."""
    if name == "ple_embed" and quantized_table(params, quant):
        yield from _table_int8(params, name)
        return
    if not quantized(params, name, quant, float_embedding):
        yield name, np.ascontiguousarray(params[name], np.float32)
        return
    own = _own_quant(params, name, quant)
    if own == "native":
        blocks = params.native(name)
        if name == "embed":
            yield "embed_q", blocks.q
            yield "embed_scale", blocks.scale
            if blocks.bias is not None:
                yield "embed_bias", blocks.bias
    else:
        w = params[name]
        rows = np.ascontiguousarray(w.T if name != "embed" else w, np.float32)   # [N, K]
        del w
        bits, asym = recipe(name, own)
        if asym:
            blocks = wq.int_blocks_asym(rows, bits, BLOCK, source=own)
        elif bits == 8:   # the lookup's table (embed) stays symmetric
            blocks = int8_blocks(rows, own, asymmetric_ok=name != "embed")
        else:             # the max-scaled 4-bit blocks tflite stores too
            blocks = wq.Blocks(4, BLOCK, *wq.int_blocks(rows, 4, BLOCK), source=own)
        if name == "embed":   # the lookup: int8 blocks, the projection's when int8
            lookup = blocks if bits == 8 else int8_blocks(rows, own, asymmetric_ok=False)
            yield "embed_q", lookup.q
            yield "embed_scale", lookup.scale
            del lookup
        del rows
        if chosen is not None:
            chosen[name] = blocks.bias is not None
    yield name, blocks
    del blocks


def _table_int8(params, name: str):
    """A lookup table as int8 blocks of BLOCK (`name`_q, `name`_scale), the float table never
    whole in memory (`quant.int8_table`)."""
    q, scale = wq.int8_table(params, name, BLOCK)
    yield name + "_q", q
    del q
    yield name + "_scale", scale


def tensor_formats(params, quant: str, float_embedding: bool, activations: str = "int8",
                   chosen: dict | None = None) -> dict[str, str]:
    """parameter -> how this artifact stores it (the manifest's record); `chosen`: what
    `weight_stream` chose per tensor (asymmetric blocks or not)."""
    out = {}
    halves = ", as two 4-bit halves" if activations == "float" else ""
    for name in params:
        src = format_of(params, name)
        if name == "ple_embed" and quantized_table(params, quant):
            out[name] = f"int8 lookup table, blocks of {BLOCK} (Gather)"
            continue
        own = _own_quant(params, name, quant)
        if not quantized(params, name, quant, float_embedding):
            out[name] = float32_record(params, name)
        elif own == "native":
            bits, block, bias = _native_layout(params, name)
            out[name] = (f"{src} kept: MatMulNBits {8 if bits > 4 else 4}-bit, block {block}"
                         + (halves if bits > 4 else "") + (", + block-sum bias" if bias else ""))
        else:
            bits, asym = recipe(name, own)
            asym = (chosen or {}).get(name, asym)
            out[name] = f"{own}: MatMulNBits {bits}-bit, block {BLOCK}, " + \
                ("asymmetric (+ block-sum bias)" if asym else "symmetric") + \
                (halves if bits > 4 else "") + \
                (f" (re-quantized from {src})" if src not in FLOAT_FORMATS else "") + \
                (" (LoRA merged)" if own != quant else "")
    return out


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    import onnx
    quant = options.get("quant") or DEFAULT_QUANT
    contract = next(iter(traced.values())).contract
    float_embedding = bool(options.get("float_embedding"))
    activations = options.get("activations") or DEFAULT_ACTIVATIONS
    out_dir.mkdir(parents=True, exist_ok=True)
    # experts as one matmul each (MatMulNBits when quantized), run in per-expert branches
    params = split_experts(params)
    work = Path(tempfile.mkdtemp(prefix="onnx-", dir=out_dir.parent))
    try:
        wspecs = weight_specs(params, quant, float_embedding)
        lower(contract, wspecs, work / "graph.onnx")
        graph = onnx.load(str(work / "graph.onnx"))
        simplified = onnx_graph.simplify(graph)
        bar = progress(total=len(params), desc=f"onnx weights ({quant})", unit="tensor") \
            if progress else None
        chosen: dict[str, bool] = {}
        counts = container.finish(graph, weight_stream(params, quant, float_embedding, chosen,
                                                       tick=bar.update if bar else None),
                                  out_dir / DATA_FILE, float_activations=activations == "float")
        if bar:
            bar.close()
        onnx.save_model(graph, str(out_dir / "model.onnx"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ops = {}
    for n in graph.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"files": {"model": "model.onnx", "weights": DATA_FILE}, "quantization": quant,
            "tensor_formats": tensor_formats(params, quant, float_embedding, activations,
                                             chosen),
            "activations": activations if counts.get("quantized_matmuls") else "float",
            "float_embedding": float_embedding,
            "max_length": contract.max_context, "cache_outputs": ct.ROWS,
            "op_counts": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "graph_rewrites": simplified,
            "weights_bytes_fp32": nbytes_of(params), **counts}

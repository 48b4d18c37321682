"""ONNX target for ONNX Runtime (CPU and CUDA): one `model.onnx` serving every signature.

The model function is the same one every target traces, lowered with jax2onnx, but with the token
dimension T symbolic (bounded by the max context) instead of one static graph per signature: ORT's
Python API cannot share weights (or their pre-packed forms) between sessions, so one graph that
runs any prefill length and the one-token decode keeps the weights stored and resident once. Inputs
and outputs carry the contract's names. Cache outputs are `rows` (`runtime.contract`): the cache
inputs are read-only and each call returns only its new K/V rows (`{name}_new`), which the runtime
writes into its cache buffers. An ONNX graph cannot alias an output to an input, so returning whole
updated caches made ORT copy every layer's cache on every decoded token (ScatterND).

Export: jax2onnx -> ORT basic optimizations (constant folding turns transposed weights into plain
MatMul initializers) -> quantization with ORT's own tools (`int4`: MatMulNBits, blockwise 32,
symmetric, accuracy level 4; `int8`: dynamic int8 MatMul) -> saved with external data
(`model.onnx.data`), so models past the 2 GB protobuf limit work. The saved model is the optimized
one: the runtime does not redo those passes at load.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime import contract as ct

from .. import kv
from .. import model as gemma
from ..weights import nbytes_of, split_embedding

NAME = "onnx"
QUANTS = ("none", "int8", "int4")
DEFAULT_QUANT = "none"
TRACE_PLATFORMS = ()   # jax2onnx lowers the model function with symbolic lengths itself
DATA_FILE = "model.onnx.data"


def lower(contract: ct.Contract, params: dict, path: Path) -> None:
    """jax2onnx with the token and past dimensions symbolic; writes path (+ external data)."""
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    cfg = contract.config
    layout = contract.kv
    names_kv = layout.names
    weights = {k: jnp.asarray(v) for k, v in params.items()}

    def fn(tokens, input_pos, *cache):
        logits, new = gemma.forward(cfg, weights, tokens, input_pos, dict(zip(names_kv, cache)),
                                    logits="last", cache_outputs=ct.ROWS, spelling="onnx")
        return (logits.astype(jnp.float32),) + tuple(new[n] for n in names_kv)

    S = contract.max_context
    windows = {c.past_window for c in layout.caches}
    local = sorted(windows - {None})
    assert len(local) <= 1, local
    # symbolic dims: T new tokens, P past slots of global layers, L of local ones (only those
    # used: jax.export refuses a dim that no input has)
    names = ["T"] + (["P"] if None in windows else []) + (["L"] if local else [])
    bounds = {"T": S, "P": S, "L": min(local[0], S) if local else S}
    dims = dict(zip(names, jax.export.symbolic_shape(
        ", ".join(names), constraints=tuple(f"{n} <= {bounds[n]}" for n in names))))
    T = dims["T"]
    specs = [jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32)]
    specs += kv.trace_specs(layout, ct.ROWS, {w: dims["P"] if w is None else dims["L"]
                                              for w in windows})
    to_onnx(fn, specs, model_name=cfg.name, return_mode="file", output_path=str(path),
            input_names=[ct.TOKENS, ct.INPUT_POS] + list(names_kv),
            output_names=[ct.LOGITS] + [ct.rows_name(n) for n in names_kv])


def optimize(src: Path, dst: Path) -> None:
    """ORT's basic (provider-independent) graph optimizations, saved to dst."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                dst.name + ".data")
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def quantize(src: Path, quant: str, float_embedding: bool, vocab: int):
    import onnx
    m = onnx.load(str(src))
    if quant == "none":
        return m
    excluded = []
    if float_embedding:   # the MatMul whose weight has `vocab` columns projects onto the vocabulary
        inits = {i.name: i for i in m.graph.initializer}
        excluded = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                    and inits[n.input[1]].dims[-1] == vocab]
    if quant == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(m, block_size=32, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=excluded)
        q.process()
        return q.model.model
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = src.with_name("int8.onnx")
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=excluded, per_channel=True, use_external_data_format=True)
    return onnx.load(str(out))


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    import onnx
    quant = options.get("quant") or DEFAULT_QUANT
    contract = next(iter(traced.values())).contract
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="onnx-", dir=out_dir.parent))
    bar = progress(total=4, desc="onnx", unit="step") if progress else None
    try:
        float_embedding = bool(options.get("float_embedding"))
        lower(contract, split_embedding(params, quant, float_embedding), work / "raw.onnx")
        if bar:
            bar.update()
        optimize(work / "raw.onnx", work / "opt.onnx")
        if bar:
            bar.update()
        m = quantize(work / "opt.onnx", quant, float_embedding, contract.config.vocab_size)
        if bar:
            bar.update()
        onnx.save_model(m, str(out_dir / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        if bar:
            bar.update()
            bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ops = {}
    for n in onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"files": {"model": "model.onnx", "weights": DATA_FILE}, "quantization": quant,
            "float_embedding": bool(options.get("float_embedding")),
            "max_length": contract.max_context, "cache_outputs": ct.ROWS,
            "op_counts": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "weights_bytes_fp32": nbytes_of(params)}

"""TFLite / LiteRT target: one multi-signature `.tflite` plus a LiteRT-LM `.litertlm` bundle.

Lowering: each traced signature function goes through jax2tf into one `tf.function` of a
`tf.Module` that holds the weights as `tf.Variable`s, so the converter stores every weight once for
all signatures (closed-over constants would be duplicated per signature). Inputs and outputs keep
the contract's names (`runtime.contract`), which are LiteRT-LM's. Builtin ops only. The V cache is stored transposed ([1, K, H, S]) so
both attention matmuls read the caches as they are: no op copies or transposes a whole cache.

Quantization (ai-edge-quantizer): `int8` = dynamic-range int8 weights, per channel (the default for
phones); `int4` = blockwise int4 (block 32) dynamic; `none` = fp32. The tied embedding/output matrix
is quantized too unless `float_embedding` is set: the output projection like every other matmul,
the lookup table as per-row int8 inside the graph (`weights.split_embedding`). Weights past the
2 GB flatbuffer limit are written after the flatbuffer with buffer offsets, which LiteRT loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime import chat

from ..weights import nbytes_of, split_embedding

NAME = "tflite"
QUANTS = ("none", "int8", "int4")
DEFAULT_QUANT = "int8"
TRACE_PLATFORMS = ()   # jax2tf lowers each traced signature function itself
FLATBUFFER_LIMIT = 2**31 - 1


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    tf.autograph.set_verbosity(0)
    return tf


def convert(traced, params: dict, work: Path, progress=None) -> bytes:
    """Float TFLite flatbuffer with one signature per traced signature."""
    tf = _quiet_tf()
    from jax.experimental import jax2tf

    module = tf.Module()
    module.weights = {k: tf.Variable(v, trainable=False, name=k.replace(".", "_"))
                      for k, v in params.items()}
    functions = {}
    bar = progress(total=len(traced) + 2, desc="tflite convert", unit="step") if progress else None
    for name, t in traced.items():
        fn = jax2tf.convert(t.fn, with_gradient=False, native_serialization_platforms=("cpu",))
        names = [s.name for s in t.signature.inputs]
        spec = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in t.signature.inputs]

        def call(*args, fn=fn, names=names):
            return fn(module.weights, dict(zip(names, args)))

        functions[name] = tf.function(call, input_signature=spec, autograph=False
                                      ).get_concrete_function()
        if bar:
            bar.update()
    saved = work / "saved_model"
    tf.saved_model.save(module, str(saved), signatures=functions)
    if bar:
        bar.update()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(functions))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if nbytes_of(params) > FLATBUFFER_LIMIT // 2:
        converter._experimental_use_buffer_offset = True   # weights after the flatbuffer
    model = converter.convert()
    shutil.rmtree(saved, ignore_errors=True)
    if bar:
        bar.update()
        bar.close()
    return model


def _logits_projection(model: bytes, vocab: int) -> str | None:
    """Name of the output tensor of the FULLY_CONNECTED that projects onto the vocabulary."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu
    m = fu.read_model(bytearray(model))
    for sg in m.subgraphs:
        for op in sg.operators:
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                w = sg.tensors[op.inputs[1]]
                if w.shape is not None and len(w.shape) == 2 and w.shape[0] == vocab \
                        and m.operatorCodes[op.opcodeIndex].builtinCode == 9:  # FULLY_CONNECTED
                    return fu.get_tensor_name(sg.tensors[op.outputs[0]])  # op scope: "name;"
    return None


def quantize(model: bytes, quant: str, float_embedding: bool, vocab: int) -> bytes:
    if quant == "none":
        return model
    import re
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer
    q = quantizer.Quantizer(bytearray(model))
    granularity = (qtyping.QuantGranularity.CHANNELWISE if quant == "int8"
                   else qtyping.QuantGranularity.BLOCKWISE_32)
    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    q.add_dynamic_config(regex=".*", operation_name=fc, num_bits=8 if quant == "int8" else 4,
                         granularity=granularity)
    if float_embedding:
        name = _logits_projection(model, vocab)
        if name is None:
            raise RuntimeError("tflite: cannot find the logits projection to keep it in float")
        q.update_quantization_recipe(regex=f"^{re.escape(name)};?$", operation_name=fc,
                                     algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    return bytes(q.quantize().quantized_model)


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    quant = options.get("quant") or DEFAULT_QUANT
    if quant not in QUANTS:
        raise ValueError(f"tflite: unsupported quantization {quant!r}; choose one of "
                         f"{', '.join(QUANTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tflite-", dir=out_dir.parent))
    float_embedding = bool(options.get("float_embedding"))
    contract = next(iter(traced.values())).contract
    try:
        model = convert(traced, split_embedding(params, quant, float_embedding), work, progress)
        model = quantize(model, quant, float_embedding, contract.vocab_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out_dir / "model.tflite").write_bytes(model)
    bundle_name = f"{contract.config.name}-{quant}.litertlm"
    bundle(out_dir / "model.tflite", Path(options["tokenizer_path"]), options["special_ids"],
           contract, out_dir / bundle_name)
    return {"files": {"model": "model.tflite", "litertlm": bundle_name}, "quantization": quant,
            "float_embedding": bool(options.get("float_embedding")),
            "weights_bytes_fp32": nbytes_of(params)}


def llm_metadata(special: dict, contract) -> bytes:
    """LiteRT-LM's LlmMetadata: start and stop tokens, Gemma's turn templates, max tokens."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2
    md = llm_metadata_pb2.LlmMetadata()
    md.start_token.token_ids.ids.append(int(special["bos"]))
    for stop in (special["eos"], special["end_of_turn"]):
        md.stop_tokens.add().token_ids.ids.append(int(stop))
    md.prompt_templates.user.prefix = chat.turn_prefix(chat.USER)
    md.prompt_templates.user.suffix = chat.TURN_SUFFIX
    md.prompt_templates.model.prefix = chat.turn_prefix(chat.MODEL)
    md.prompt_templates.model.suffix = chat.TURN_SUFFIX
    md.max_num_tokens = contract.max_context
    if contract.config.family == 3:
        md.llm_model_type.gemma3.SetInParent()
    else:
        md.llm_model_type.generic_model.SetInParent()
    md.supports_thinking = False
    md.supports_function_calling = False
    return md.SerializeToString()


def engine_tokenizer(model_proto: bytes, special: dict) -> bytes:
    """The tokenizer for LiteRT-LM's engine: its prompt templates (and the Android app's prompts)
    spell the turn markers as text, so the start/end-of-turn markers must be USER_DEFINED
    pieces, matched in text, as in Gemma's own tokenizer. (GGUF types them CONTROL, which
    SentencePiece never produces from text; our runtime inserts them as ids instead.)"""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    m = sp_pb2.ModelProto()
    m.ParseFromString(model_proto)
    for key in ("start_of_turn", "end_of_turn"):
        m.pieces[int(special[key])].type = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    return m.SerializeToString()


def bundle(tflite_path: Path, tokenizer_path: Path, special: dict, contract, out: Path) -> None:
    """A `.litertlm` file (litert-lm-builder): the TFLite model, the engine's SentencePiece
    tokenizer and LlmMetadata, as LiteRT-LM's engine and the Android app load it."""
    from litert_lm_builder import litertlm_builder as lb
    from litert_lm_builder import litertlm_core
    md_path = out.with_name(out.name + ".llm_metadata.pb")
    md_path.write_bytes(llm_metadata(special, contract))
    tok_path = out.with_name(out.name + ".tokenizer.model")
    tok_path.write_bytes(engine_tokenizer(tokenizer_path.read_bytes(), special))
    try:
        b = lb.LitertLmFileBuilder()
        b.add_system_metadata(lb.Metadata(key="model", value=contract.config.name,
                                          dtype=lb.DType.STRING))
        b.add_system_metadata(lb.Metadata(key="producer", value="gemma-aot",
                                          dtype=lb.DType.STRING))
        b.add_tflite_model(str(tflite_path), lb.TfLiteModelType.PREFILL_DECODE)
        b.add_sentencepiece_tokenizer(str(tok_path))
        b.add_llm_metadata(str(md_path))
        with litertlm_core.open_file(str(out), "wb") as f:
            b.build(f, validate_metadata=True)
    finally:
        md_path.unlink(missing_ok=True)
        tok_path.unlink(missing_ok=True)

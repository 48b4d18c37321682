"""TFLite target: every signature vs the JAX reference, the op list, quantization, the bundle."""

import json

import numpy as np
import pytest

import runtime
from litert_converter import schema_py_generated as S
from compile import export as ex, recipes, trace
from runtime import contract as ct

CONTRACT = dict(prefill_lengths=(4, 8), max_context=64)


def _export(variant, contract=CONTRACT, **options):
    """(checkpoint, the shared tflite artifact of that tiny variant): exported once for the suite
    (tests/artifacts.py); a test that changes it copies it first."""
    from artifacts import exported
    out = exported(f"random:{variant}", ["tflite"], contract["prefill_lengths"],
                   contract["max_context"], options)
    return ex.random_checkpoint(variant), out


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma3-270m-tiny"])
def test_fp32_tflite_matches_reference(tmp_path, variant):
    ck, out = _export(variant, quant="none")
    gen = runtime.load(out, target="tflite")
    assert gen.backend.num_threads >= 1
    tokens = np.random.default_rng(2).integers(0, ck.config.vocab_size, 36).astype(np.int32)
    want = trace.reference_logits(ct.Contract(ck.config, **CONTRACT), ck.params, tokens)
    got = gen.logits(tokens, start=21)             # prefill 8 + 8 + 8 (5 real), then decode
    np.testing.assert_allclose(got, want[21:], atol=5e-5, rtol=0)
    m = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
    assert m["quantization"] == "none" and m["parity"]["top1_agreement"] == 1.0


def _read(path):
    """The flatbuffer as objects (buffers stay views of the bytes read)."""
    return S.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)


def _cache_consumers(path, cache_shapes):
    """(op name, subgraph) for every op that takes a tensor shaped like a whole KV cache."""
    m = _read(path)
    op_names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for si, sub in enumerate(m.subgraphs):
        for op in sub.operators:
            code = m.operatorCodes[op.opcodeIndex]
            code = max(code.builtinCode, code.deprecatedBuiltinCode)
            if any(i >= 0 and tuple(int(d) for d in sub.tensors[i].shape) in cache_shapes
                   for i in op.inputs):
                out.append((op_names.get(code, code), si))
    return out


def test_no_op_copies_or_transposes_a_whole_cache(tmp_path):
    # prefill lengths chosen so no activation (scores: S x G*T) shares a cache's shape
    lengths = dict(prefill_lengths=(3, 8), max_context=64)
    ck, out = _export("gemma3-270m-tiny", lengths, quant="none")
    contract = ct.Contract(ck.config, **lengths)
    consumers = _cache_consumers(out / "tflite" / "model.tflite",
                                 {tuple(t.shape) for t in contract.kv_specs()})
    assert consumers, "no op reads the caches?"
    assert {name for name, _ in consumers} <= {"DYNAMIC_UPDATE_SLICE", "BATCH_MATMUL"}, consumers


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_tflite(tmp_path, quant):
    ck, out = _export("gemma3-270m-tiny", quant=quant)
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
    assert art["quantization"] == quant
    parity = art["parity"]
    assert parity["top1_agreement"] >= 0.9 and parity["mean_abs_diff"] > 0
    assert art["files"]["model"]["bytes"] < art["weights_bytes_fp32"]
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(out / "tflite" / "model.tflite"))
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    fc = [details[o["inputs"][1]] for o in ops if o["op_name"] == "FULLY_CONNECTED"]
    assert {t["dtype"] for t in fc} - {np.float32} == {np.int8}  # int4 is packed in int8 storage
    # the default recipe (int8: rotate-smooth-gptq, int4: rotate-smooth) rotates matmul inputs
    # by float Hadamard blocks, one small FULLY_CONNECTED each
    rotations = [t for t in fc if t["dtype"] == np.float32]
    assert art["recipe"]["name"] == recipes.DEFAULT[quant] and rotations
    for t in rotations:   # [out, in] = H, the lookup's 1 / s folded in per output row
        w = np.abs(it.get_tensor(t["index"]))
        assert w.shape[0] == w.shape[1] and w.shape[0] & (w.shape[0] - 1) == 0
        np.testing.assert_allclose(w, np.broadcast_to(w[:, :1], w.shape), rtol=1e-6)
    tables = [details[o["inputs"][0]] for o in ops if o["op_name"] == "GATHER_ND"
              and tuple(details[o["inputs"][0]]["shape"]) == (512, 64)]
    assert [t["dtype"] for t in tables] == [np.int8]            # the embedding lookup table
    gen = runtime.load(out)
    assert gen.target == "tflite"
    assert len(gen.generate("the cat", max_new_tokens=4)) > 0


def _stored_weights(path):
    """param name -> (tensor, its bytes) for every FULLY_CONNECTED weight of the first subgraph."""
    from compile.weights import tflite as container
    m = _read(path)
    raw = path.read_bytes()
    sg = m.subgraphs[0]
    out = {}
    for op in sg.operators:
        code = m.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == S.BuiltinOperator.FULLY_CONNECTED:
            t = sg.tensors[op.inputs[1]]
            b = m.buffers[t.buffer]
            name = container._param_of(t)
            assert b.offset > 1 and b.data is None, "weights are stored after the flatbuffer"
            if name is not None:   # not a recipe's rotation (a graph constant)
                out[name] = (t, raw[b.offset:b.offset + b.size], sg, m, raw)
    return out


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_stored_weights_equal_the_numpy_quantizer(tmp_path, quant):
    """Every matmul weight in the file is the streaming quantizer's output for the checkpoint's
    tensor as the export's recipe transformed it (its default, recalibrated here), bit for bit,
    with its scales (int8: rounded by the recipe's GPTQ, the head to nearest); and every matmul
    weight is quantized."""
    from compile import recipes
    from compile.model import is_linear
    from compile.targets import tflite
    from compile.weights import quant as wq
    ck, out = _export("gemma3-270m-tiny", quant=quant)
    recipe = recipes.plan(json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
                          ["recipe"]["name"], ck.config,
                          tflite.quantized_names(ck.params, quant, False), ck.params,
                          ck.tokenizer_model, ck.special_ids["bos"])
    stored = _stored_weights(out / "tflite" / "model.tflite")
    want = sorted(n for n in ck.params if is_linear(n)) + ["embed"]
    assert sorted(stored) == sorted(want)
    for name, (t, data, sg, m, raw) in stored.items():
        w = recipe.transform(name, ck.params[name])
        rows = w if name == "embed" else w.T                                  # [out, in]
        assert tuple(t.shape) == rows.shape
        if quant == "int8":
            q, scale = recipe.int8(name) or wq.int8_rows(rows)   # GPTQ's rounding, or nearest
            assert t.type == S.TensorType.INT8
            np.testing.assert_array_equal(np.frombuffer(data, np.int8).reshape(rows.shape), q)
            np.testing.assert_array_equal(t.quantization.scale, scale)
            assert t.quantization.quantizedDimension == 0 and not t.quantization.zeroPoint.any()
        else:
            q, scale = wq.int4_blocks(rows)
            assert t.type == S.TensorType.INT4 and t.quantization.details.blockSize == 32
            np.testing.assert_array_equal(wq.unpack_int4(np.frombuffer(data, np.uint8), q.size)
                                          .reshape(rows.shape), q)
            st = sg.tensors[t.quantization.details.scales]
            sb = m.buffers[st.buffer]
            assert st.type == S.TensorType.FLOAT16
            np.testing.assert_array_equal(
                np.frombuffer(raw[sb.offset:sb.offset + sb.size], np.float16).reshape(scale.shape),
                scale)


def test_rewrite_refuses_a_weight_no_matmul_reads(tmp_path):
    """A quantized weight left behind a CAST would compute with unscaled values: refused."""
    from compile.weights import tflite as container
    _, out = _export("gemma3-270m-tiny", quant="none")
    src = out / "tflite" / "model.tflite"
    scale = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="tflite: no matmul reads layers.0.q_proj; cannot "
                                         "quantize them"):
        container.finish(src, tmp_path / "x.tflite",
                         {"layers.0.q_proj": container.Quantized("int8", scale)})
    assert not (tmp_path / "x.tflite").exists() and not list(tmp_path.glob("x.tflite*"))


def test_float_embedding_keeps_output_layer_float(tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    _, out = _export("gemma3-270m-tiny", quant="int8", float_embedding=True)
    it = Interpreter(model_path=str(out / "tflite" / "model.tflite"))
    details = {t["index"]: t for t in it.get_tensor_details()}
    vocab_weights = [details[o["inputs"][1]]["dtype"] for o in it._get_ops_details()
                     if o["op_name"] == "FULLY_CONNECTED"
                     and tuple(details[o["inputs"][1]]["shape"]) == (512, 64)]
    assert vocab_weights == [np.float32]


def test_bad_quant_and_corrupt_tflite(tiny_artifacts, tmp_path):
    ck = ex.random_checkpoint("gemma-2b-tiny")
    with pytest.raises(ValueError, match="target 'tflite' does not support --quant int3; "
                                         "it supports: none, native, int8, int4"):
        ex.export(ck, ct.Contract(ck.config, **CONTRACT), ["tflite"], tmp_path / "x",
                  {"quant": "int3"}, log=lambda m: None)
    with pytest.raises(ValueError, match="target 'xla' does not support --quant int8"):
        ex.export(ck, ct.Contract(ck.config, **CONTRACT), ["xla"], tmp_path / "x",
                  {"quant": "int8"}, log=lambda m: None)
    assert not (tmp_path / "x").exists()

    from artifacts import copy_of
    _, out = _export("gemma-2b-tiny", quant="none")
    out = copy_of(out, tmp_path / "copy")
    model = out / "tflite" / "model.tflite"
    data = bytearray(model.read_bytes())
    garbled = bytes(data[:8]) + b"\xff" * 56 + bytes(data[64:])   # same size, garbled header
    model.write_bytes(garbled)
    with pytest.raises(runtime.ArtifactError, match="model.tflite does not match the sha256"):
        runtime.load(out, target="tflite")
    model.write_bytes(b"\0" * len(data))
    with pytest.raises(RuntimeError, match="LiteRT cannot load .*model.tflite: not a TFLite"):
        runtime.load(out, target="tflite", verify=False)


def test_litertlm_bundle_structure(tmp_path):
    _, out = _export("gemma3-270m-tiny", quant="int8")
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
    bundle = out / art["files"]["litertlm"]["path"]
    assert bundle.name == "gemma3-270m-tiny-int8.litertlm"
    head = bundle.read_bytes()[:32]
    assert head[:8] == b"LITERTLM"
    assert int.from_bytes(head[8:12], "little") == 1              # major version
    # LiteRT-LM's engine reads the turn markers its prompt templates spell as text as the
    # control ids, while our runtime's tokenizer keeps them out of user text
    import tempfile
    import litert_lm
    gen = runtime.load(out, target="tflite")
    tok, m = gen.tokenizer, json.loads((out / "manifest.json").read_text())["tokenizer"]
    engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=1),
                              cache_dir=tempfile.mkdtemp(dir=tmp_path))
    try:
        got = engine.tokenize("<start_of_turn>user\nthe cat<end_of_turn>\n")
    finally:
        engine.close()
    assert got == ([m["start_of_turn"]] + tok.encode("user\nthe cat") + [m["end_of_turn"]]
                   + tok.encode("\n"))
    assert m["start_of_turn"] not in tok.encode("<start_of_turn>user")


@pytest.mark.real   # slow: writes and runs a 2 GB model
def test_weights_over_2gb_export_and_run(tmp_path):
    """Past the 2 GB limits of flatbuffers and protobuf, in one export for both targets (one
    checkpoint, one reference): tflite stores its buffers after the flatbuffer, onnx its weights
    as external data. Each ran through the runtime in the export's parity check (runtime.load
    on the staged files, prefill and decode against the reference); loading the published
    copies again (13 s) would repeat it."""
    from helpers import synthetic_over_2gb
    ck = synthetic_over_2gb()
    out = tmp_path / "big"
    ex.export(ck, ct.Contract(ck.config, (4,), 16), ["tflite", "onnx"], out, {"quant": "none"},
              log=lambda m: None)
    arts = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert arts["tflite"]["files"]["model"]["bytes"] > 2**31
    assert arts["onnx"]["files"]["weights"]["bytes"] > 2**31 > arts["onnx"]["files"]["model"]["bytes"]
    for target in ("tflite", "onnx"):
        assert arts[target]["parity"]["top1_agreement"] == 1.0, target
        assert arts[target]["parity"]["max_rel_diff"] < 2e-4, target
        assert arts[target]["parity"]["decode_steps"] >= 4, target

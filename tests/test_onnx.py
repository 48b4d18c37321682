"""ONNX target and the onnx runtime backend: parity with the JAX reference, quantization,
provider choice, and many threads generating at once from one loaded model."""

import json
import threading

import numpy as np
import pytest

import runtime
from compile import export as ex, trace
from runtime import contract as ct
from compile.targets import onnx as onnx_target
from runtime.backends.onnx import pick_provider

CONTRACT = dict(prefill_lengths=(4, 8), max_context=64)


@pytest.fixture(scope="module")
def onnx_artifacts(tiny_export):
    """(variant, quant) -> (checkpoint, the shared onnx artifact of that tiny variant)."""
    def get(variant, quant="none"):
        return ex.random_checkpoint(variant), tiny_export(variant, ["onnx"], quant=quant)
    return get


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma3-270m-tiny"])
def test_onnx_matches_reference(onnx_artifacts, variant):
    ck, out = onnx_artifacts(variant)
    gen = runtime.load(out, target="onnx")
    import onnxruntime as ort
    assert gen.backend.provider == pick_provider(ort.get_available_providers())
    tokens = np.random.default_rng(4).integers(0, ck.config.vocab_size, 37).astype(np.int32)
    want = trace.reference_logits(ct.Contract(ck.config, **CONTRACT), ck.params, tokens)
    got = gen.logits(tokens, start=19)             # prefill 8 + 8 + 3 unpadded, then decode
    np.testing.assert_allclose(got, want[19:], atol=5e-5, rtol=0)
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]
    assert art["cache_outputs"] == "rows" and art["parity"]["top1_agreement"] == 1.0
    assert art["op_counts"]["MatMul"] >= 7 * ck.config.num_layers // 2
    # onnx_graph.simplify: every RMS norm is one node, and no reshape computes its shape
    c = ck.config
    norms = c.num_layers * (2 + 2 * c.post_norms + 2 * c.qk_norm) + 1
    assert art["graph_rewrites"]["rms_norm"] == norms
    assert art["op_counts"]["SimplifiedLayerNormalization"] == norms
    assert "ReduceMean" not in art["op_counts"] and "Sqrt" not in art["op_counts"]
    # what makes jax2onnx's NO_OP_PASSES no-ops (skipped: the real 270M's graph is the same
    # bytes without them): none of the ops they rewrite is in a Gemma graph
    assert not {"ConvTranspose", "Dropout", "Sigmoid", "Swish"} & set(art["op_counts"])


@pytest.mark.parametrize("quant,op", [("int4", "MatMulNBits"), ("int8", "MatMulNBits")])
def test_quantized_onnx(onnx_artifacts, quant, op):
    ck, out = onnx_artifacts("gemma3-270m-tiny", quant)
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]
    assert art["quantization"] == quant
    layers = ck.config.num_layers
    assert art["op_counts"].get(op, 0) == 7 * layers + 1      # every projection and the logits
    # what stays float is attention: scores and mix over the cache and over the new rows
    assert art["op_counts"].get("MatMul", 0) == 4 * layers
    assert art["files"]["weights"]["bytes"] < 0.5 * art["weights_bytes_fp32"]
    assert art["parity"]["top1_agreement"] >= 0.9
    assert len(runtime.load(out).generate("the cat", max_new_tokens=3)) > 0


def _initializers(out):
    """name -> array of every initializer, read from the external data file as ORT would."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    raw = (out / "onnx" / "model.onnx.data").read_bytes()
    arrays = {}
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data"
            begin, length = int(info["offset"]), int(info["length"])
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            arrays[t.name] = np.frombuffer(raw[begin:begin + length], dtype).reshape(tuple(t.dims))
        else:
            arrays[t.name] = numpy_helper.to_array(t)
    return m, arrays


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_stored_weights_equal_the_checkpoint_and_the_numpy_quantizer(onnx_artifacts, quant):
    """fp32: every weight is the checkpoint's tensor bit for bit; quantized: every MatMulNBits
    holds the numpy quantizer's blocks of the weight's rows, bit for bit, with its scales."""
    from compile.model import is_linear
    from compile.weights import quant as wq
    ck, out = onnx_artifacts("gemma3-270m-tiny", quant)
    m, arrays = _initializers(out)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    if quant == "none":
        assert not nbits
        for name in ck.params:
            np.testing.assert_array_equal(arrays[name], ck.params[name])
        return
    bits = {"int8": 8, "int4": 4}[quant]
    read = {n.input[1][:-len(".B")] for n in nbits}
    assert read == {n for n in ck.params if is_linear(n)} | {"embed"}
    for n in nbits:
        name = n.input[1][:-len(".B")]
        w = ck.params[name]
        rows = w if name == "embed" else w.T                                   # [N, K]
        if bits == 8 and name != "embed":   # least-error scales, asymmetric where they pay
            b = onnx_target.int8_blocks(np.asarray(rows, np.float32), quant)
            q, scale = b.q, b.scale
            if b.bias is not None:
                np.testing.assert_array_equal(arrays[f"{name}.bias_t"], b.bias.T)
        else:
            q, scale = wq.int_blocks(rows, bits, 32, search=bits == 8)
        attrs = {a.name: a.i for a in n.attribute}
        assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == \
            (rows.shape[1], rows.shape[0], bits, 32)
        u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(-1)
        if bits == 4:
            u = u[0::2] | (u[1::2] << 4)
        np.testing.assert_array_equal(arrays[n.input[1]].reshape(-1), u)
        np.testing.assert_array_equal(arrays[n.input[2]], scale.reshape(-1))
    q8, s8 = wq.int_blocks(ck.params["embed"], 8, 32, search=True)   # the lookup: int8 blocks
    np.testing.assert_array_equal(arrays["embed_q"], q8)
    np.testing.assert_array_equal(arrays["embed_scale"], s8)
    assert "embed" not in arrays                        # the float table is not stored


def test_provider_rule():
    assert pick_provider(["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        "CUDAExecutionProvider"
    assert pick_provider(["CPUExecutionProvider"]) == "CPUExecutionProvider"


def test_concurrent_generations_equal_sequential(onnx_artifacts):
    _, out = onnx_artifacts("gemma3-270m-tiny")
    gen = runtime.load(out, target="onnx")
    requests = [dict(prompt=p, max_new_tokens=12, temperature=1.0, top_k=50, seed=s)
                for s, p in enumerate(["the cat", "on the mat", "is it", "at the end", "the",
                                       "an art", "or not", "she said"])]
    want = [list(gen.stream_ids(gen.tokenizer.prompt_ids(r["prompt"]),
                                **{k: v for k, v in r.items() if k != "prompt"}))
            for r in requests]
    assert len({tuple(w) for w in want}) > 1
    got = [None] * len(requests)
    errors = []

    def work(i):
        try:
            r = requests[i]
            got[i] = list(gen.stream_ids(gen.tokenizer.prompt_ids(r["prompt"]),
                                         **{k: v for k, v in r.items() if k != "prompt"}))
        except Exception as e:   # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == want


def test_corrupt_onnx_is_refused(onnx_artifacts, tmp_path):
    import shutil
    _, src = onnx_artifacts("gemma-2b-tiny")
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    model = out / "onnx" / "model.onnx"
    model.write_bytes(b"\x08" + b"\xff" * (model.stat().st_size - 1))
    with pytest.raises(runtime.ArtifactError, match="onnx artifact: .*model.onnx does not match "
                                                    "the sha256 its manifest records"):
        runtime.load(out, target="onnx")
    # unverified, ONNX Runtime's own refusal still reaches the user with the file's name
    with pytest.raises(RuntimeError, match="ONNX Runtime cannot load .*model.onnx"):
        runtime.load(out, target="onnx", verify=False)


def test_onnx_artifact_with_whole_cache_outputs_is_refused(onnx_artifacts, tmp_path):
    """An artifact from before cache outputs became `rows` is not run (its outputs are whole
    caches); the error names the fix."""
    import shutil
    _, src = onnx_artifacts("gemma-2b-tiny")
    out = tmp_path / "old"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["artifacts"]["onnx"]["cache_outputs"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    from runtime.manifest import ArtifactError
    with pytest.raises(ArtifactError, match="cannot run the 'onnx' artifact here: it returns whole "
                       "caches per call .*re-export it with `python -m compile.export --target onnx`"):
        runtime.load(out, target="onnx")


def test_onnx_graph_reads_past_views_and_returns_rows(onnx_artifacts):
    """The contract's `rows` form as ONNX sees it: past inputs with symbolic lengths (P for global
    layers, L for local ones), new rows [1, K, T, H] out, and no op that writes a cache."""
    import onnx
    ck, out = onnx_artifacts("gemma3-270m-tiny")
    g = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(g.input) + list(g.output)}
    cfg = ck.config
    for c in ct.KVLayout.of(cfg).caches:
        past = "P" if c.past_window is None else "L"
        for name in c.names:
            assert dims[name] == [1, cfg.num_kv_heads, past, cfg.head_dim], (name, dims[name])
            assert dims[ct.rows_name(name)] == [1, cfg.num_kv_heads, "T", cfg.head_dim]
    assert not {n.op_type for n in g.node} & {"ScatterND", "ScatterElements", "Einsum"}


def test_mixed_recipe_stores_int8_and_asymmetric_int4_blocks(onnx_artifacts):
    """`mixed`: the embedding/output, v and down as symmetric int8 blocks, the other projections
    as asymmetric int4 blocks (the numpy quantizer's, bit for bit, with a block-sum bias term);
    the lookup reads the projection's own int8 blocks."""
    from helpers import onnx_matmul_nbits_weights
    from compile.model import is_linear
    from compile.weights import quant as wq
    ck, out = onnx_artifacts("gemma3-270m-tiny", "mixed")
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]
    formats = art["tensor_formats"]
    assert formats["embed"] == "mixed: MatMulNBits 8-bit, block 32, symmetric"
    assert formats["layers.1.down_proj"] == "mixed: MatMulNBits 8-bit, block 32, symmetric"
    assert formats["layers.1.q_proj"] == \
        "mixed: MatMulNBits 4-bit, block 32, asymmetric (+ block-sum bias)"
    m, arrays = _initializers(out)
    bits = {n.input[1][:-len(".B")]: {a.name: a.i for a in n.attribute}["bits"]
            for n in m.graph.node if n.op_type == "MatMulNBits"}
    names = [n for n in ck.params if is_linear(n)] + ["embed"]
    assert bits == {n: 8 if n == "embed" or n.endswith(("v_proj", "down_proj")) else 4
                    for n in names}
    stored = onnx_matmul_nbits_weights(out, names)
    for n in names:
        rows = np.asarray(ck.params[n], np.float32)
        rows = rows if n == "embed" else rows.T
        want = wq.int_blocks_asym(rows, 4, 32).dequantize() if bits[n] == 4 else \
            wq.Blocks(8, 32, *wq.int_blocks(rows, 8, 32, search=True)).dequantize() \
            if n == "embed" else onnx_target.int8_blocks(rows, "mixed").dequantize()
        np.testing.assert_allclose(stored[n], want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=n)
        if bits[n] == 4:   # the asymmetric grid is finer than the symmetric one on every block
            sym = wq.Blocks(4, 32, *wq.int_blocks(rows, 4, 32)).dequantize()
            assert np.abs(want - rows).mean() < np.abs(sym - rows).mean()
    np.testing.assert_array_equal(arrays["embed_q"],
                                  wq.int_blocks(ck.params["embed"], 8, 32, search=True)[0])
    assert art["parity"]["top1_agreement"] >= 0.9

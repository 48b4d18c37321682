"""Gemma 4 specifics: the text part of a multimodal checkpoint, and bad checkpoints refused with
errors that say what is wrong (the logits themselves are checked against transformers in
test_model_vs_hf and through the cache in test_kv_cache, on every Gemma 4 tiny config)."""

import json

import numpy as np
import pytest

from compile import checkpoints
from compile.checkpoints import CheckpointError
from compile.config import get_variant
from helpers import write_hf_checkpoint


def _as_multimodal(src, dst, keep_text: bool = True):
    """A Gemma4ForConditionalGeneration-style directory from a causal-LM one: config under
    `text_config`, weights under `model.language_model.` (what transformers saves for it), plus
    a vision tensor."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": cfg, "vision_config": {"model_type": "gemma4_vision"}}))
    w = load_file(str(src / "model.safetensors"))
    out = {"model.vision_tower.patch.weight": np.zeros((4, 4), np.float32)}
    if keep_text:
        out.update({"model.language_model." + k[len("model."):]: v for k, v in w.items()})
    save_file(out, str(dst / "model.safetensors"))
    (dst / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())


def test_text_model_of_a_multimodal_checkpoint_loads(tmp_path):
    cfg = get_variant("gemma4-e2b-tiny")
    write_hf_checkpoint(cfg, tmp_path / "lm")
    _as_multimodal(tmp_path / "lm", tmp_path / "mm")
    a, b = checkpoints.load(tmp_path / "lm"), checkpoints.load(tmp_path / "mm")
    assert a.config == b.config and a.params.keys() == b.params.keys()
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def test_multimodal_checkpoint_without_text_weights_is_refused(tmp_path):
    write_hf_checkpoint(get_variant("gemma4-26b-a4b-tiny"), tmp_path / "lm")
    _as_multimodal(tmp_path / "lm", tmp_path / "mm", keep_text=False)
    with pytest.raises(CheckpointError, match="no text-model weights found .*model.language_model"):
        checkpoints.load(tmp_path / "mm")


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["sliding_attention", "chunked_attention"] + ["full_attention"] * 4),
     "layer 1 has layer type 'chunked_attention', which this compiler does not know"),
    (dict(per_layer_config={"0": {"head_dim": 32}}),
     "per_layer_config overrides layer 0, a sliding layer"),
    (dict(per_layer_config={"2": {"intermediate_size": 8}}),
     r"per_layer_config of layer 2 overrides \['intermediate_size'\]"),
    (dict(use_bidirectional_attention="all"), "not a causal language model"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default"}}),
     "unsupported rope type 'yarn'"),
])
def test_bad_gemma4_configs_are_refused_by_name(tmp_path, change, message):
    write_hf_checkpoint(get_variant("gemma4-31b-tiny"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load(tmp_path)


@pytest.fixture(scope="module")
def gemma4_exports(tmp_path_factory):
    """variant -> (transformers model, artifact dir with xla, onnx and fp32 tflite), exported
    from the HF directory transformers wrote with `native`, onnx's default, which keeps a
    float checkpoint float on every target (E2B's per-layer table included: it was int8 and
    failed the exact parity limit)."""
    from artifacts import exported
    cache = {}

    def get(variant):
        if variant not in cache:
            src = tmp_path_factory.mktemp("hf") / variant
            hf_model = write_hf_checkpoint(get_variant(variant), src)
            out = exported(f"hf:{variant}", ["xla", "onnx", "tflite"], (4, 8), 64,
                           {"quant": "native"}, ck=checkpoints.load(src))
            cache[variant] = hf_model, out
        return cache[variant]
    return get


@pytest.mark.parametrize("target", ["xla", "onnx", "tflite"])
@pytest.mark.parametrize("variant", ["gemma4-e2b-tiny", "gemma4-e4b-tiny", "gemma4-26b-a4b-tiny",
                                     "gemma4-31b-tiny"])
def test_every_target_matches_transformers(gemma4_exports, variant, target):
    """The oracle on each artifact: a 21-token prompt (chunks 8 + 8 + 8, past the window of 8)
    and 15 decode steps across it; the shared layers read their producers' caches, the experts
    run densely in prefill and gathered in decode."""
    import torch
    import runtime
    hf_model, out = gemma4_exports(variant)
    tokens = np.random.default_rng(2).integers(0, 512, 36).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(tokens[None]).long()).logits[0].float().numpy()
    gen = runtime.load(out, target=target)
    assert gen.target == target
    np.testing.assert_allclose(gen.logits(tokens, start=21), want[21:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.logits(tokens[:6]), want[:6], atol=1e-4, rtol=0)


def test_litert_lm_engine_runs_a_gemma4_bundle(gemma4_exports, tmp_path):
    """LiteRT-LM's engine takes the bundle as it is: cache names with gaps (the KV-shared layers
    own none), two head sizes (16 local, 32 global), experts and per-layer embeddings inside the
    graph. Its greedy continuation equals our runtime's on the same file (the bundles the
    transformers test above checked)."""
    import litert_lm
    import runtime
    for variant in ("gemma4-e2b-tiny", "gemma4-26b-a4b-tiny"):
        cfg = get_variant(variant)
        _, out = gemma4_exports(variant)
        art = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
        names = [t["name"] for t in json.loads((out / "manifest.json").read_text())
                 ["signatures"]["entries"][-1]["inputs"]]
        assert "kv_cache_k_5" in names and "kv_cache_k_6" not in names or \
            not cfg.kv_shared_layers
        gen = runtime.load(out, target="tflite")
        engine = litert_lm.Engine(str(out / art["files"]["litertlm"]["path"]),
                                  backend=litert_lm.Backend.CPU(thread_count=2),
                                  cache_dir=str(tmp_path))
        try:
            for prompt in ("the cat sat on the mat", "a b c d e f g h i j k"):
                ours = list(gen.stream_ids(gen.tokenizer.prompt_ids(prompt), max_new_tokens=12))
                session = engine.create_session(apply_prompt_template=False,
                                                max_output_tokens=12,
                                                sampler_config=litert_lm.SamplerConfig(top_k=1))
                session.run_prefill([prompt])              # the engine adds <bos> itself
                text = session.run_decode().texts[0]
                session.close()
                theirs = gen.tokenizer.encode(text)
                assert len(theirs) >= 8 and theirs[:8] == ours[:8], (variant, prompt, text)
        finally:
            engine.close()


def test_expert_parts_read_alone_equal_the_stacks(tmp_path):
    """split_experts: each expert's matmul, read from its own rows of the safetensors file (the
    fused gate_up halves included), equals its slice of the whole stack."""
    from compile.weights import expert_name, split_experts
    write_hf_checkpoint(get_variant("gemma4-26b-a4b-tiny"), tmp_path)
    params = checkpoints.load(tmp_path).params
    split = split_experts(params)
    for stack in ("layers.2.experts_gate", "layers.2.experts_up", "layers.5.experts_down"):
        whole = params[stack]
        for e in range(whole.shape[0]):
            np.testing.assert_array_equal(split[expert_name(stack, e)], whole[e])
    assert not any(n.endswith(("experts_gate", "experts_up", "experts_down")) for n in split)


def test_quantized_onnx_moe_keeps_each_expert_in_its_own_branch(tmp_path):
    """int4 onnx: every expert's three matmuls are MatMulNBits inside its own If branch (skipped
    unless a token chose the expert), and the artifact agrees with the reference."""
    import onnx
    import runtime
    from compile import export as ex, trace
    from compile.weights.onnx import _graphs
    from runtime import contract as ct
    ck = ex.random_checkpoint("gemma4-26b-a4b-tiny")
    cfg = ck.config
    contract = ct.Contract(cfg, (4, 8), 64)
    out = tmp_path / "art"
    ex.export(ck, contract, ["onnx"], out, {"quant": "int4"}, log=lambda m: None)
    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    ifs = [n for n in m.graph.node if n.op_type == "If"]
    assert len(ifs) == cfg.num_layers * cfg.num_experts
    for n in ifs:
        then = next(a.g for a in n.attribute if a.name == "then_branch")
        ops = [x.op_type for sub in _graphs(then) for x in sub.node]
        assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops
        assert not any("expert" in i for x in then.node for i in x.input
                       if x.op_type != "MatMulNBits")
    gen = runtime.load(out, target="onnx")
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, 30).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = gen.logits(tokens, start=17)
    assert (got.argmax(-1) == want[17:].argmax(-1)).mean() >= 0.9


def test_quantized_per_layer_table_is_an_int8_lookup_read_in_row_chunks(tmp_path):
    """E2B's per-layer embedding table (about half of E2B's weights) is stored as int8 blocks
    and read by row (one Gather per call), quantized ROW_CHUNK rows at a time; a random source
    draws it chunk by chunk, so any row range reads alone and equals the whole table's rows."""
    import onnx
    import runtime
    from compile import export as ex, trace
    from compile.weights import seeded, take_rows
    from compile.weights.sources import ROW_CHUNK
    from runtime import contract as ct
    t = seeded({"ple_embed": (2 * ROW_CHUNK + 5, 4)}, 0, lambda n, s: 1.0)
    whole = t["ple_embed"]
    ids = np.array([[3, ROW_CHUNK + 1], [2 * ROW_CHUNK + 4, 3]])
    np.testing.assert_array_equal(take_rows(t, "ple_embed", ids), whole[ids])
    np.testing.assert_array_equal(t.tensors["ple_embed"].get_rows(ROW_CHUNK - 2, ROW_CHUNK + 3),
                                  whole[ROW_CHUNK - 2:ROW_CHUNK + 3])

    ck = ex.random_checkpoint("gemma4-e2b-tiny")
    contract = ct.Contract(ck.config, (4, 8), 64)
    out = tmp_path / "art"
    ex.export(ck, contract, ["onnx"], out, {"quant": "int8"}, log=lambda m: None)
    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    assert inits["ple_embed_q"].data_type == onnx.TensorProto.INT8 and "ple_embed" not in inits
    assert [n.op_type for n in m.graph.node if "ple_embed_q" in n.input] == ["Gather"]
    gen = runtime.load(out, target="onnx")
    tokens = np.random.default_rng(6).integers(0, ck.config.vocab_size, 30).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = gen.logits(tokens, start=17)
    assert (got.argmax(-1) == want[17:].argmax(-1)).mean() >= 0.9


def test_random_full_size_qk_norms_carry_the_attention_scale():
    """Gemma 4 scales attention by 1: random full-size q/k norm weights centre on head_dim^-1/4
    (global layers' 512 and sliding ones' 256 alike), so q.k has Gemma 1-3's 1/sqrt(head_dim);
    other norms still centre on 1, Gemma 3's (1 + w) norms on 0."""
    from compile.model import full_size_params
    cfg = get_variant("gemma4-26b-a4b-tiny")
    p = full_size_params(cfg, 0)
    for a in cfg.attention()[:3]:
        for n in ("q_norm", "k_norm"):
            w = p[f"layers.{a.layer}.{n}"]
            assert w.shape == (a.head_dim,)
            assert abs(w.mean() - a.head_dim ** -0.25) < 0.25 * a.head_dim ** -0.25
    assert abs(p["layers.0.attn_norm"].mean() - 1.0) < 0.1
    g3 = full_size_params(get_variant("gemma3-270m-tiny"), 0)
    assert abs(g3["layers.0.q_norm"].mean()) < 0.15


def test_tflite_splits_a_per_layer_table_past_int32_element_counts(tmp_path, monkeypatch):
    """TFLite's gather kernels count a tensor's elements in int32 (full-size E2B's int8 table,
    2.35e9 values, failed every lookup as "index out of bounds"): the table is stored in column
    parts under the limit, whose concatenation is the whole table, and the artifact still agrees
    with the reference. Forced here with a limit small enough for a tiny model."""
    import runtime
    from compile import export as ex, trace
    from compile.targets import tflite
    from compile.weights import quant as wq
    from runtime import contract as ct
    ck = ex.random_checkpoint("gemma4-e2b-tiny")
    V, K = ck.params.tensors["ple_embed"].shape
    parts = wq.int8_table_parts(ck.params, "ple_embed", 32, V * K // 3)
    assert len(parts) >= 3 and all(q.size <= V * K // 3 for q, _ in parts)
    q, scale = wq.int8_table(ck.params, "ple_embed", 32)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], -1), q)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], -1), scale)

    monkeypatch.setattr(tflite, "TENSOR_ELEMENTS", V * K // 3)
    consts, _ = tflite.weight_forms(ck.params, "int8", False)
    assert "ple_embed_q" not in consts and "ple_embed2_q" in consts
    contract = ct.Contract(ck.config, (4, 8), 64)
    out = tmp_path / "art"
    ex.export(ck, contract, ["tflite"], out, {"quant": "int8"}, log=lambda m: None)
    gen = runtime.load(out, target="tflite")
    tokens = np.random.default_rng(6).integers(0, ck.config.vocab_size, 30).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = gen.logits(tokens, start=17)
    assert (got.argmax(-1) == want[17:].argmax(-1)).mean() >= 0.9

"""The real Gemma 3 270M through the TFLite and ONNX targets, our runtime and LiteRT-LM's engine."""

import json

import pytest

import runtime

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"


def test_int8_quality_size_and_litert_lm_engine(real_tflite, tmp_path):
    import litert_lm
    out = real_tflite("int8")
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
    assert art["quantization"] == "int8"
    assert art["parity"]["top1_agreement"] >= 0.95 and art["parity"]["decode_steps"] >= 32
    assert art["files"]["model"]["bytes"] < 0.45 * art["weights_bytes_fp32"]
    # the default export (no flag) passed the quality gate: at least llama.cpp's figures on the
    # same weights, thanks to its recipe (rotation and smoothing before int8, the int8 values
    # rounded by GPTQ: compile.recipes)
    q = art["quality"]
    assert q["passed"] and not q["accepted_loss"] and q["positions"] >= 511
    assert q["rule"] == "llama.cpp on the same weights"
    # scored through verify_8 (64 calls, not 512 decodes), itself held to the reference by the
    # parity check beside decode; LiteRT-LM's engine below runs the bundle with it inside
    assert q["through"] == "verify, 8 tokens a call"
    assert art["parity"]["verify"]["top1_agreement"] >= 0.95
    assert q["top1"] >= q["limits"]["min_top1"] and q["mean_kl"] <= q["limits"]["max_kl"]
    assert q["ppl_delta_rel"] <= q["limits"]["max_ppl_delta_rel"]
    recipe = art["recipe"]
    assert recipe["name"] == "rotate-smooth-gptq" and recipe["rotation"]["matmuls"] == 7 * 18 + 1
    assert recipe["smoothing"]["calibration"]["tokens"][0] >= 512   # after the gate's slice
    assert recipe["rounding"]["matmuls"] == 7 * 18   # every projection; the head to nearest

    gen = runtime.load(out)
    assert gen.target == "tflite"
    ours = list(gen.stream_ids(gen.tokenizer.prompt_ids(PROMPT), max_new_tokens=24))
    bundle = out / art["files"]["litertlm"]["path"]
    engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=2),
                              cache_dir=str(tmp_path))
    try:
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=24,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        session.run_prefill([PROMPT])                 # the engine adds <bos> itself
        text = session.run_decode().texts[0]
        session.close()
    finally:
        engine.close()
    theirs = gen.tokenizer.encode(text)
    assert len(theirs) >= 16
    assert theirs[:16] == ours[:16], (text, gen.tokenizer.decode(ours))


def test_android_app_prompt_path_in_litert_lm_engine(real_tflite, tmp_path):
    """The Android demo hands a fresh Session the chat prompt minus what the session adds itself
    (<bos>, the bundle's user prefix/suffix and model prefix): the model must see exactly our
    runtime's chat prompt, so the engine's greedy reply equals ours."""
    import litert_lm
    from runtime.chat import render_chat
    out = real_tflite("int8")
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["tflite"]
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]
    full = render_chat(msgs)
    head, tail = "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"
    session_input = full[len(head):-len(tail)]             # GemmaTemplate.sessionInput in Kotlin
    gen = runtime.load(out)
    ours = list(gen.stream_ids(gen.tokenizer.prompt_ids(msgs, chat=True), max_new_tokens=12))
    engine = litert_lm.Engine(str(out / art["files"]["litertlm"]["path"]),
                              backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(tmp_path))
    try:
        session = engine.create_session(apply_prompt_template=True, max_output_tokens=12,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        session.run_prefill([session_input])
        text = session.run_decode().texts[0]
        session.close()
    finally:
        engine.close()
    theirs = gen.tokenizer.encode(text)
    assert len(ours) >= 3 and theirs[:len(ours)] == ours[:len(theirs)] and len(theirs) >= 3, \
        (text, gen.tokenizer.decode(ours))


@pytest.fixture(scope="module")
def real_onnx(real_export):
    """quant -> the real 270M's onnx artifact (conftest's real_export)."""
    return lambda quant: real_export("onnx", quant)


def test_native_onnx_keeps_the_gguf_blocks_and_beats_llama_cpp_quality(real_onnx, real_gguf):
    """The default model's own Q8_0/Q5_0/Q4_K/Q6_K blocks, stored unchanged, and the export's
    quality gate on the evaluation text passed (at llama.cpp's level or better)."""
    from helpers import assert_stores_gguf_values
    out = real_onnx("native")
    art = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]
    assert art["op_counts"]["MatMulNBits"] == 7 * 18 + 1
    formats = art["tensor_formats"]
    assert formats["embed"] == "Q8_0 kept: MatMulNBits 8-bit, block 32"
    assert formats["layers.0.o_proj"] == "Q4_K kept: MatMulNBits 4-bit, block 32, + block-sum bias"
    assert formats["layers.0.down_proj"] == "Q6_K kept: MatMulNBits 8-bit, block 16"
    q = art["quality"]
    assert q["passed"] and not q["accepted_loss"] and q["positions"] >= 511
    assert q["top1"] >= q["limits"]["min_top1"] and q["mean_kl"] <= q["limits"]["max_kl"]
    assert q["through"] == "verify, 64 tokens a call"       # any length: logit_index
    # stored integers and scales dequantize to what gguf dequantizes (Q4_K with its bias term)
    pairs = {"layers.0.o_proj": "blk.0.attn_output.weight",
             "layers.0.down_proj": "blk.0.ffn_down.weight", "layers.3.q_proj": "blk.3.attn_q.weight"}
    assert_stores_gguf_values(out, real_gguf, pairs)
    gen = runtime.load(out)
    assert gen.target == "onnx" and gen.generate(PROMPT, max_new_tokens=16).strip()

"""Shared test helpers: tiny Hugging Face checkpoints written by transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compile.config import LOCAL, GemmaConfig
from compile.tokenizer import tiny_tokenizer

# One tiny config per architecture switch: Gemma 1 with one KV head and with full heads, Gemma 2,
# Gemma 3 without and with the x8 global RoPE scaling, Gemma 3 27B's query scale.
TINY_VARIANTS = ["gemma-2b-tiny", "gemma-7b-tiny", "gemma2-2b-tiny", "gemma2-27b-tiny",
                 "gemma3-270m-tiny", "gemma3-4b-tiny"]
# Gemma 4: E2B (PLE, KV sharing of both layer types, double-wide FFN), E4B (PLE, sharing, two KV
# heads), 26B-A4B (experts, k_eq_v with one global KV head), 31B (k_eq_v, dense)
GEMMA4_TINY = ["gemma4-e2b-tiny", "gemma4-e4b-tiny", "gemma4-26b-a4b-tiny", "gemma4-31b-tiny"]


def hf_config(cfg: GemmaConfig):
    import transformers as tf
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                  intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                  hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                  pad_token_id=0, max_position_embeddings=4096)
    types = ["sliding_attention" if cfg.layer_type(i) == LOCAL else "full_attention"
             for i in range(cfg.num_layers)]
    if cfg.family == 1:
        return tf.GemmaConfig(**common, rope_parameters={"rope_type": "default",
                                                         "rope_theta": cfg.rope_base_global})
    if cfg.family == 2:
        return tf.Gemma2Config(**common, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
                               sliding_window=cfg.sliding_window, layer_types=types,
                               attn_logit_softcapping=cfg.attn_softcap,
                               final_logit_softcapping=cfg.final_softcap,
                               rope_parameters={"rope_type": "default",
                                                "rope_theta": cfg.rope_base_global})
    if cfg.family == 4:
        return tf.Gemma4TextConfig(
            **common, sliding_window=cfg.sliding_window, layer_types=types,
            final_logit_softcapping=cfg.final_softcap,
            global_head_dim=cfg.global_head_dim or cfg.head_dim,
            num_global_key_value_heads=cfg.global_kv_heads,
            attention_k_eq_v=cfg.k_eq_v, num_kv_shared_layers=cfg.kv_shared_layers,
            use_double_wide_mlp=cfg.double_wide_mlp,
            hidden_size_per_layer_input=cfg.ple_dim,
            vocab_size_per_layer_input=cfg.ple_vocab_size or cfg.vocab_size,
            enable_moe_block=bool(cfg.num_experts), num_experts=cfg.num_experts or None,
            top_k_experts=cfg.top_k_experts or None,
            moe_intermediate_size=cfg.moe_ffn_dim or None,
            rope_parameters={
                "full_attention": {"rope_type": "proportional", "rope_theta": cfg.rope_base_global,
                                   "partial_rotary_factor": cfg.rope_fraction_global},
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}})
    full = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    if cfg.rope_scale_global != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scale_global,
                "rope_theta": cfg.rope_base_global}
    return tf.Gemma3TextConfig(**common, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
                               sliding_window=cfg.sliding_window, layer_types=types,
                               rope_parameters={"full_attention": full, "sliding_attention": {
                                   "rope_type": "default", "rope_theta": cfg.rope_base_local}})


def write_hf_checkpoint(cfg: GemmaConfig, path: Path, seed: int = 0):
    """A transformers model with random weights (norm scales too), saved as an HF directory with a
    tiny SentencePiece tokenizer. Returns the torch model in eval mode."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    cls = {1: tf.GemmaForCausalLM, 2: tf.Gemma2ForCausalLM, 3: tf.Gemma3ForCausalLM,
           4: tf.Gemma4ForCausalLM}[cfg.family]
    hf_cfg._attn_implementation = "eager"
    model = cls(hf_cfg).eval()
    # Gemma 4's norms multiply by w itself, as do its layer and router scales: centre them on 1
    scales = ("norm", "layer_scalar", "router.scale", "per_expert_scale")
    with torch.no_grad():
        buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("layer_scalar")]
        for name, p in list(model.named_parameters()) + buffers:
            if any(k in name for k in scales):
                p.normal_(1.0 if cfg.family == 4 else 0.0, 0.2)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            elif "experts" in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(path)
    model_bytes, _ = tiny_tokenizer(cfg.vocab_size)
    (Path(path) / "tokenizer.model").write_bytes(model_bytes)
    return model


def synthetic_over_2gb():
    """A one-layer Gemma 3 with a 131072 x 4096 embedding: 2.16e9 bytes of fp32 weights, past the
    2 GB limits of flatbuffers and protobuf."""
    import dataclasses
    from compile.checkpoints import Checkpoint
    from compile.config import get_variant
    from compile.model import init_params
    cfg = dataclasses.replace(get_variant("gemma3-270m-tiny"), name="gemma3-synthetic-2gb",
                              vocab_size=131_072, d_model=4096, num_layers=1,
                              layer_types=("local",))
    # the table drawn uniform in float32 (std 1, as init_params draws it): init_params draws
    # float64 normals and casts, 23 s for these 537M values against 4 s
    params = init_params(dataclasses.replace(cfg, vocab_size=256), 0)
    table = np.random.default_rng(0).random((cfg.vocab_size, cfg.d_model), dtype=np.float32)
    table -= np.float32(0.5)
    table *= np.float32(np.sqrt(12.0))
    params["embed"] = table
    assert sum(v.nbytes for v in params.values()) > 2**31
    tok, special = tiny_tokenizer(cfg.vocab_size)
    return Checkpoint(cfg, params, tok, special, source={"format": "random"})


_GGUF_ARCH = {1: "gemma", 2: "gemma2", 3: "gemma3", 4: "gemma4"}


def write_gguf_metadata(w, cfg: GemmaConfig, max_context: int = 8192) -> None:
    """The model metadata llama.cpp's convert_hf_to_gguf writes for a Gemma of this config (it
    stores no query scale and, for Gemma 3, no local RoPE base)."""
    w.add_context_length(max_context)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base_global)
    if cfg.family >= 2:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.family == 2:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.family == 3 and cfg.rope_scale_global != 1.0:
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scale_global)
    if cfg.family == 4:
        _write_gemma4_metadata(w, cfg)


def _write_gemma4_metadata(w, cfg: GemmaConfig) -> None:
    """What llama.cpp's Gemma4Model (conversion/gemma.py) adds: the global layers' head dim as
    key_length and the sliding ones' as key_length_swa, per-layer arrays where layers differ, and
    the rope_freqs tensor of proportional RoPE (factor 1 on rotating pairs, 1e30 on the rest).
    It writes nothing for k_eq_v: that is global layers without attn_v."""
    L = cfg.num_layers
    local = [t == LOCAL for t in cfg.layer_types]
    w.add_sliding_window_pattern(local)
    w.add_key_length(cfg.global_head_dim)
    w.add_value_length(cfg.global_head_dim)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    w.add_rope_dimension_count(cfg.global_head_dim)
    w.add_rope_dimension_count_swa(cfg.head_dim)
    w.add_rope_freq_base_swa(cfg.rope_base_local)
    if cfg.global_kv_heads:
        w.add_head_count_kv([cfg.num_kv_heads if s else cfg.global_kv_heads for s in local])
    if cfg.double_wide_mlp:
        w.add_feed_forward_length([cfg.layer_ffn_dim(i) for i in range(L)])
    w.add_shared_kv_layers(cfg.kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.ple_dim)
    w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_ffn_dim)
    pairs = cfg.global_head_dim // 2
    rotating = int(cfg.global_head_dim * cfg.rope_fraction_global / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotating + [1e30] * (pairs - rotating),
                                               np.float32))


def write_gguf_vocab(w, model_proto: bytes, kind: str = "llama") -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm
    m = spm.ModelProto()
    m.ParseFromString(model_proto)
    w.add_tokenizer_model(kind)
    w.add_token_list([p.piece for p in m.pieces])
    w.add_token_scores([p.score for p in m.pieces])
    w.add_token_types([3 if p.type == 2 else p.type for p in m.pieces])   # GGUF: unk is CONTROL
    t = m.trainer_spec
    w.add_bos_token_id(t.bos_id)
    w.add_eos_token_id(t.eos_id)
    w.add_pad_token_id(t.pad_id)
    w.add_unk_token_id(t.unk_id)


def write_gguf_from_hf(hf_model, cfg: GemmaConfig, path: Path, vocab_kind: str = "llama",
                       chat_template: str | None = None, model_bytes: bytes | None = None
                       ) -> None:
    """The transformers model's weights as llama.cpp's converter writes them: GGUF names, F32,
    every RMSNorm weight with +1 added, the tiny tokenizer's vocabulary."""
    import gguf
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm",
             "post_attention_layernorm": "ffn_norm" if cfg.family == 1 else "post_attention_norm"}
    if cfg.family == 4:   # Gemma 4 norms multiply by w: stored unshifted
        names.update(_GGUF_GEMMA4)
    shift = 1.0 if cfg.norm_plus_one else 0.0
    w = gguf.GGUFWriter(str(path), _GGUF_ARCH[cfg.family])
    write_gguf_metadata(w, cfg)
    write_gguf_vocab(w, model_bytes or tiny_tokenizer(cfg.vocab_size)[0], vocab_kind)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, p in hf_model.state_dict().items():
        a = p.detach().float().numpy()
        top = name.removeprefix("model.").removesuffix(".weight")
        if top in _GGUF_GEMMA4_TOP:
            w.add_tensor(f"{_GGUF_GEMMA4_TOP[top]}.weight", a)
        elif name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a + shift)
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            ours = names[rest.removesuffix(".weight")]
            if "." not in ours:
                ours += ".weight"   # the router's two scales are named .scale
            w.add_tensor(f"blk.{i}.{ours}", a + shift if ours.endswith("norm.weight") else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# llama.cpp's names for Gemma 4's additions (gguf-py tensor_mapping.py; conversion/gemma.py puts
# the router's scale and per-expert scale beside ffn_gate_inp / ffn_down_exps as .scale)
_GGUF_GEMMA4 = {"per_layer_input_gate": "inp_gate", "per_layer_projection": "proj",
                "post_per_layer_input_norm": "post_norm", "layer_scalar": "layer_output_scale",
                "router.proj": "ffn_gate_inp", "router.scale": "ffn_gate_inp.scale",
                "router.per_expert_scale": "ffn_down_exps.scale",
                "experts.gate_up_proj": "ffn_gate_up_exps", "experts.down_proj": "ffn_down_exps",
                "pre_feedforward_layernorm_2": "pre_ffw_norm_2",
                "post_feedforward_layernorm_1": "post_ffw_norm_1",
                "post_feedforward_layernorm_2": "post_ffw_norm_2"}
_GGUF_GEMMA4_TOP = {"embed_tokens_per_layer": "per_layer_token_embd",
                    "per_layer_model_projection": "per_layer_model_proj",
                    "per_layer_projection_norm": "per_layer_proj_norm"}


_GGUF_LINEAR = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_GGUF_NORM = {"attn_norm": "attn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
              "post_attn_norm": "post_attention_norm", "ffn_norm": "ffn_norm",
              "post_ffn_norm": "post_ffw_norm"}


def write_quantized_gguf(cfg: GemmaConfig, params: dict, path: Path, types: dict) -> None:
    """Our params (model layout) written as llama.cpp does, block-quantized by `gguf`'s own
    quantizers: `types` maps "embed" and each linear kind ("q_proj", ...) to a GGML type name
    (missing: F32)."""
    import gguf
    w = gguf.GGUFWriter(str(path), _GGUF_ARCH[cfg.family])
    write_gguf_metadata(w, cfg)
    write_gguf_vocab(w, tiny_tokenizer(cfg.vocab_size)[0])

    def add(name, a, kind):
        t = types.get(kind)
        if t is None:
            w.add_tensor(name, np.ascontiguousarray(a, np.float32))
        else:
            qt = gguf.GGMLQuantizationType[t]
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qt),
                         raw_dtype=qt)
    add("token_embd.weight", params["embed"], "embed")
    add("output_norm.weight", params["final_norm"] + 1.0, None)
    for name, a in params.items():
        if not name.startswith("layers."):
            continue
        _, i, kind = name.split(".", 2)
        if kind in _GGUF_LINEAR:
            add(f"blk.{i}.{_GGUF_LINEAR[kind]}.weight", np.asarray(a).T, kind)   # [out, in]
        else:
            add(f"blk.{i}.{_GGUF_NORM[kind]}.weight", np.asarray(a) + 1.0, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def onnx_matmul_nbits_weights(art_dir: Path, names) -> dict:
    """name -> float32 [N, K]: what the ONNX artifact's MatMulNBits (plus its block-sum bias term,
    if any) computes with for weight `name`, read back from the external data file."""
    import onnx
    m = onnx.load(str(art_dir / "onnx" / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    data = np.memmap(art_dir / "onnx" / "model.onnx.data", np.uint8, mode="r")

    def read(name):
        t = inits[name]
        ext = {e.key: e.value for e in t.external_data}
        raw = data[int(ext["offset"]):int(ext["offset"]) + int(ext["length"])]
        return raw.view(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))

    nodes = {n.input[1]: n for n in m.graph.node if n.op_type == "MatMulNBits"}

    def term(prefix):
        B = read(f"{prefix}.B")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[f"{prefix}.B"].attribute}
        bits, N, nb = attrs["bits"], B.shape[0], B.shape[1]
        u = B.reshape(N, -1) if bits == 8 else np.stack([B & 15, B >> 4], -1).reshape(N, -1)
        w = (u.astype(np.float32) - (1 << (bits - 1))).reshape(N, nb, -1) \
            * read(f"{prefix}.scales").reshape(N, nb, 1)
        return w, attrs["K"]

    out = {}
    for name in names:
        # one term, or two 4-bit halves (float activations: weights.onnx.halves)
        prefixes = [name] if f"{name}.B" in inits else [f"{name}.hi", f"{name}.lo"]
        terms = [term(p) for p in prefixes]
        w = sum(t[0] for t in terms)
        if f"{name}.bias_t" in inits:
            w = w + read(f"{name}.bias_t").T[..., None]
        out[name] = w.reshape(w.shape[0], terms[0][1])
    return out


def assert_stores_gguf_values(art_dir: Path, gguf_path: Path, pairs: dict) -> None:
    """Every weight of `pairs` (ours -> GGUF tensor name), as the ONNX artifact's MatMulNBits
    compute with it, equals `gguf`'s own dequantization within float rounding."""
    stored = onnx_matmul_nbits_weights(art_dir, pairs)
    wants = gguf_dequantized(gguf_path, pairs.values())
    for ours, theirs in pairs.items():
        want = wants[theirs]
        np.testing.assert_allclose(stored[ours], want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=ours)


def gguf_dequantized(path: Path, names) -> dict:
    """GGUF tensor name -> float32 [out, in] as `gguf` itself dequantizes it (the oracle for kept
    blocks). The tensor table is read by the loader's reader (test_loaders holds it to gguf's
    own, which takes 10 s over the real model's vocabulary)."""
    import gguf
    from compile.checkpoints.gguf import _open
    tensors = {t.name: t for t in _open(Path(path)).tensors}
    return {n: gguf.quants.dequantize(tensors[n].data, tensors[n].tensor_type).reshape(
                tuple(int(d) for d in reversed(tensors[n].shape))) for n in names}


def cli(module: str, *args):
    """Runs `python -m module args` in this process (its `main(argv)`), as the CLI would, and
    returns (returncode, stdout, stderr) like subprocess.run: a fresh Python and JAX per call
    cost seconds, so error paths run here and each CLI keeps one real subprocess test. An
    exception escaping main() is a traceback the user would see: it fails the test."""
    import contextlib
    import importlib
    import io
    import signal
    import types
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = importlib.import_module(module).main([str(a) for a in args])
            except SystemExit as e:   # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())

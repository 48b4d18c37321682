"""LoRA adapters merged at export (`compile.lora`), against the oracle: PEFT on transformers, the
same base, the same adapter. Tiny random bases of each family with random adapters whose B is not
zero (PEFT initialises B to zero: such an adapter would change nothing)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compile import lora
from compile.checkpoints import load
from compile.config import get_variant
from compile.model import forward
from helpers import write_hf_checkpoint, write_gguf_from_hf

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(hf_model, path, seed=0, **config):
    """A PEFT LoRA adapter on hf_model with random non-zero B, saved to path. Returns the PEFT
    model (eval mode)."""
    from peft import LoraConfig, get_peft_model
    config = {"r": 4, "lora_alpha": 8, "target_modules": ALL, **config}
    pm = get_peft_model(hf_model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    pm.save_pretrained(str(path))
    return pm.eval()


def _tokens(cfg, T=None):
    T = T or 3 * (cfg.sliding_window or 8) + 5
    return np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, T)).astype(np.int32)


def _ours(ck, tokens):
    got, _ = forward(ck.config, {k: jnp.asarray(v) for k, v in ck.params.items()},
                     jnp.asarray(tokens), jnp.arange(tokens.shape[1], dtype=jnp.int32))
    return np.asarray(got)


@pytest.mark.parametrize("variant,config", [
    ("gemma-2b-tiny", {}),
    ("gemma2-2b-tiny", {"use_rslora": True}),
    ("gemma3-270m-tiny", {"rank_pattern": {"v_proj": 2, "down_proj": 6},
                          "alpha_pattern": {"o_proj": 3}, "layers_to_transform": [0, 1]}),
    ("gemma4-e2b-tiny", {}),                      # KV-shared layers: their k/v LoRA is unused
    ("gemma4-26b-a4b-tiny", {"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]}),
])
def test_merged_model_matches_peft(tmp_path, variant, config):
    """Our JAX model on the merged weights equals PEFT's forward (adapter unmerged) on a prompt
    past the sliding window; --lora-scale 0.5 equals PEFT with every scaling halved."""
    cfg = get_variant(variant)
    hf_model = write_hf_checkpoint(cfg, tmp_path / "base")
    pm = _adapter(hf_model, tmp_path / "ad", **config)
    tokens = _tokens(cfg)
    with torch.no_grad():
        want = pm(torch.from_numpy(tokens).long()).logits.float().numpy()
    ck = load(tmp_path / "base")
    merged = lora.apply(ck, tmp_path / "ad")
    assert merged.source["lora"]["rank"] == max([4, *config.get("rank_pattern", {}).values()])
    got = _ours(merged, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - _ours(ck, tokens)).max() > 1e-2       # the adapter does change the output
    # half the adapter: PEFT's own scaling, halved
    for module in pm.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: v * 0.5 for k, v in module.scaling.items()}
    with torch.no_grad():
        want_half = pm(torch.from_numpy(tokens).long()).logits.float().numpy()
    np.testing.assert_allclose(_ours(lora.apply(ck, tmp_path / "ad", 0.5), tokens), want_half,
                               atol=1e-4, rtol=0)


def test_gguf_base_takes_the_same_adapter(tmp_path):
    """PEFT's module names map onto a GGUF base: the merged weights equal the HF base's."""
    cfg = get_variant("gemma3-270m-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp_path / "base")
    write_gguf_from_hf(hf_model, cfg, tmp_path / "base.gguf")
    _adapter(hf_model, tmp_path / "ad")
    a = lora.apply(load(tmp_path / "base"), tmp_path / "ad")
    b = lora.apply(load(tmp_path / "base.gguf"), tmp_path / "ad")
    assert a.params.merged == b.params.merged and len(a.params.merged) == 7 * cfg.num_layers
    for name in a.params.merged:
        np.testing.assert_allclose(b.params[name], a.params[name], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Gemma 3 base, an adapter, PEFT's logits, and the merged export on every target."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = get_variant("gemma3-270m-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp / "base")
    pm = _adapter(hf_model, tmp / "ad")
    tokens = _tokens(cfg, 21)[0]
    with torch.no_grad():
        want = pm(torch.from_numpy(tokens[None]).long()).logits[0].float().numpy()
    out = tmp / "art"
    from helpers import cli   # the CLI in process: main(argv)
    r = cli("compile.export", "--checkpoint", tmp / "base", "--lora", tmp / "ad", "--target",
            "xla,onnx,tflite", "--quant", "none", "--prefill-lengths", "4,8", "--max-context",
            "64", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"LoRA: merged {7 * cfg.num_layers} matmuls" in r.stderr
    return tmp, tokens, want, out


@pytest.mark.parametrize("target", ["xla", "onnx", "tflite"])
def test_merged_artifacts_match_peft(exported, target):
    import runtime
    tmp, tokens, want, out = exported
    gen = runtime.load(out, target=target)
    np.testing.assert_allclose(gen.logits(tokens, start=13), want[13:], atol=1e-4, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["model"]["source"]["lora"]
    assert rec["rank"] == 4 and rec["scale"] == 1.0 and rec["targets"] == sorted(ALL)


def test_native_onnx_keeps_untouched_blocks_and_requantizes_merged_ones(tmp_path):
    """A block-quantized GGUF base with --quant native: the adapter's matmuls are float after the
    merge and take the int8 recipe; every other matmul keeps the checkpoint's blocks."""
    from compile import export as ex
    from helpers import write_quantized_gguf
    from runtime import contract as ct
    cfg = get_variant("gemma3-270m-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp_path / "base")
    _adapter(hf_model, tmp_path / "ad", target_modules=["q_proj", "down_proj"])
    params = {k: np.asarray(v) for k, v in load(tmp_path / "base").params.items()}
    types = {k: "Q8_0" for k in ["embed"] + ALL}
    write_quantized_gguf(cfg, params, tmp_path / "q.gguf", types)
    ck = lora.apply(load(tmp_path / "q.gguf"), tmp_path / "ad")
    ex.export(ck, ct.Contract(ck.config, (4, 8), 64), ["onnx"], tmp_path / "art",
              {"quant": "native"}, log=lambda m: None)
    formats = json.loads((tmp_path / "art" / "manifest.json").read_text())[
        "artifacts"]["onnx"]["tensor_formats"]
    assert formats["layers.0.q_proj"].startswith("int8: MatMulNBits 8-bit") and \
        "LoRA merged" in formats["layers.0.q_proj"]
    assert formats["layers.0.k_proj"].startswith("Q8_0 kept")


def _export_cli(tmp_path, adapter, *extra):
    """The export CLI in process (its main(argv)); the merged export above runs it for real."""
    from helpers import cli
    out = tmp_path / "art"
    r = cli("compile.export", "--checkpoint", tmp_path / "base", "--lora", adapter, "--target",
            "onnx", "--quant", "none", "--prefill-lengths", "4", "--max-context", "16",
            "--out", out, *extra)
    return r, out


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cfg = get_variant("gemma3-270m-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp / "base")
    _adapter(hf_model, tmp / "ad")
    other = write_hf_checkpoint(get_variant("gemma2-2b-tiny"), tmp / "other")
    _adapter(other, tmp / "other_ad")
    return tmp


def _copy_adapter(src, dst, edit_config=None, edit_weights=None):
    import shutil
    shutil.copytree(src, dst)
    if edit_config:
        c = json.loads((dst / lora.CONFIG_FILE).read_text())
        edit_config(c)
        (dst / lora.CONFIG_FILE).write_text(json.dumps(c))
    if edit_weights:
        edit_weights(dst / lora.WEIGHTS_FILE)
    return dst


@pytest.mark.parametrize("case,message", [
    ("other_base", r"lora_A \[4, 64\] and lora_B \[\d+, 4\] do not fit the base's layers\.0\."),
    ("dora", "use_dora is not supported"),
    ("modules_to_save", "modules_to_save is not supported"),
    ("loha", "peft_type 'LOHA' is not supported"),
    ("bias", "bias 'all' is not supported"),
    ("rank_mismatch", "has rank 4, but adapter_config.json says 3"),
    ("corrupt", "adapter_model.safetensors"),
    ("embedding", "LoRA on embeddings is not supported"),
    ("no_dir", "not a directory"),
    ("pissa", "init_lora_weights 'pissa_niter_4' is not supported"),
    ("pattern_list", "rank_pattern must be an object"),
    ("pattern_regex", "alpha_pattern key 'q_proj(' is not a valid pattern"),
    ("r_bool", "r must be a positive number, not True"),
    ("two_adapters", "more than one lora_A"),
])
def test_bad_adapters_are_refused_by_name_and_nothing_is_written(base_and_adapter, tmp_path,
                                                                 case, message):
    tmp = base_and_adapter
    (tmp_path / "base").symlink_to(tmp / "base")
    ad = tmp / "ad"
    if case == "other_base":
        ad = tmp / "other_ad"
    elif case == "dora":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(use_dora=True))
    elif case == "modules_to_save":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(modules_to_save=["lm_head"]))
    elif case == "loha":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(peft_type="LOHA"))
    elif case == "bias":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(bias="all"))
    elif case == "rank_mismatch":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(r=3))
    elif case == "corrupt":
        def cut(f):
            f.write_bytes(f.read_bytes()[:100])
        ad = _copy_adapter(ad, tmp_path / "x", edit_weights=cut)
    elif case == "embedding":
        def add_embedding(f):
            from safetensors.numpy import load_file, save_file
            w = load_file(str(f))
            w["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 8), np.float32)
            save_file(w, str(f))
        ad = _copy_adapter(ad, tmp_path / "x", edit_weights=add_embedding)
    elif case == "no_dir":
        ad = tmp_path / "missing"
    elif case == "pissa":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(init_lora_weights="pissa_niter_4"))
    elif case == "pattern_list":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(rank_pattern=["q_proj"]))
    elif case == "pattern_regex":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(alpha_pattern={"q_proj(": 4}))
    elif case == "r_bool":
        ad = _copy_adapter(ad, tmp_path / "x", lambda c: c.update(r=True))
    elif case == "two_adapters":
        def second(f):
            from safetensors.numpy import load_file, save_file
            w = load_file(str(f))
            for k in [k for k in w if "layers.0.self_attn.q_proj" in k]:
                w[k.replace(".weight", ".other.weight")] = w[k]
                w[k.replace(".weight", ".default.weight")] = w.pop(k)
            save_file(w, str(f))
        ad = _copy_adapter(ad, tmp_path / "x", edit_weights=second)
    r, out = _export_cli(tmp_path, ad)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert message in r.stderr or __import__("re").search(message, r.stderr), r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("variant", ["gemma-2b", "gemma2-27b", "gemma3-270m", "gemma4-e2b",
                                     "gemma4-e4b", "gemma4-26b-a4b", "gemma4-31b",
                                     "gemma4-e2b-tiny", "gemma4-26b-a4b-tiny"])
def test_lora_slots_are_the_matmuls_the_model_has(variant):
    """The contract's slot widths (from the manifest's config alone) are the model's matmul
    shapes, and exactly the matmuls it computes (no k/v on KV-shared layers, no v under k_eq_v,
    double-wide FFNs)."""
    from compile.model import param_shapes
    from runtime import contract as ct
    cfg = get_variant(variant)
    shapes = param_shapes(cfg)
    slots = ct.lora_slots(cfg.to_dict())
    assert {(f"layers.{s.layer}.{s.target}", (s.n_in, s.n_out)) for s in slots} == \
        {(n, shape) for n, shape in shapes.items() if n.rsplit(".", 1)[-1] in ct.LORA_TARGETS}
    assert [s.target for s in ct.lora_slots(cfg.to_dict(), ("v_proj",))] == \
        ["v_proj"] * sum(n.endswith(".v_proj") for n in shapes)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        ct.lora_slots(cfg.to_dict(), ("q_proj", "lm_head"))


@pytest.mark.parametrize("variant", ["gemma3-270m-tiny", "gemma4-e2b-tiny"])
def test_run_time_slots_equal_the_merged_weights(tmp_path, variant):
    """The model with an adapter in its low-rank slots (A = lora_A^T, B = scaling * lora_B^T,
    zero-padded to a larger rank) equals the model on the merged weights; zero slots equal the
    base."""
    from compile import model as gemma
    cfg = get_variant(variant)
    hf_model = write_hf_checkpoint(cfg, tmp_path / "base")
    _adapter(hf_model, tmp_path / "ad", target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])
    ck = load(tmp_path / "base")
    adapter = lora.read(tmp_path / "ad", ck.config, ck.params)
    R = 8
    base = {k: np.asarray(v) for k, v in ck.params.items()}
    slots, zeros = dict(base), dict(base)
    for name, m in adapter.modules.items():
        n_in, n_out = base[name].shape
        a, b = np.zeros((n_in, R), np.float32), np.zeros((R, n_out), np.float32)
        a[:, :m.rank], b[:m.rank] = m.a.T, (m.scaling * m.b).T
        slots[name + gemma.LORA_A], slots[name + gemma.LORA_B] = a, b
        zeros[name + gemma.LORA_A], zeros[name + gemma.LORA_B] = np.zeros_like(a), np.zeros_like(b)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_ours(dataclasses.replace(ck, params=slots), tokens),
                               _ours(lora.apply(ck, tmp_path / "ad"), tokens), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(_ours(dataclasses.replace(ck, params=zeros), tokens), _ours(ck, tokens))


def test_float_base_stays_float_and_vision_modules_are_skipped(tmp_path):
    """onnx's default (`native`) on a float base keeps the merged matmuls float too, and parity
    holds at the exact limits; an adapter that also adapted a vision tower (PEFT's all-linear on
    a multimodal checkpoint) merges its text modules and skips the rest."""
    from safetensors.numpy import load_file, save_file
    from compile import export as ex
    from runtime import contract as ct
    cfg = get_variant("gemma3-270m-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp_path / "base")
    _adapter(hf_model, tmp_path / "ad", target_modules=["q_proj", "down_proj"])
    w = load_file(str(tmp_path / "ad" / lora.WEIGHTS_FILE))
    w["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = \
        np.ones((4, 8), np.float32)
    w["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = \
        np.ones((8, 4), np.float32)
    save_file(w, str(tmp_path / "ad" / lora.WEIGHTS_FILE))
    logs = []
    ck = lora.apply(load(tmp_path / "base"), tmp_path / "ad", log=logs.append)
    assert any("1 module(s) skipped" in m and "vision_tower" in m for m in logs), logs
    ex.export(ck, ct.Contract(ck.config, (4, 8), 64), ["onnx"], tmp_path / "art",
              log=lambda m: None)
    art = json.loads((tmp_path / "art" / "manifest.json").read_text())["artifacts"]["onnx"]
    assert art["tensor_formats"]["layers.0.q_proj"].startswith("float32")
    assert art["parity"]["tolerance"]["max_rel_diff"] < 1e-3      # the exact (float) limits

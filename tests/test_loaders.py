"""Both checkpoint loaders map names onto the family rules of `compile.config`: the same model read
from a GGUF file (as llama.cpp writes it) and from a Hugging Face directory (as transformers writes
it) gives identical configs and weights."""

import dataclasses

import numpy as np
import pytest

from compile import checkpoints
from compile.checkpoints.gguf import _open as open_gguf, config_from_gguf
from compile.checkpoints.hf import config_from_hf
from compile.config import FAMILIES, VARIANTS, get_variant
from helpers import (GEMMA4_TINY, TINY_VARIANTS, hf_config, write_gguf_from_hf, write_gguf_metadata,
                     write_hf_checkpoint)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_registry_variant_from_either_format(variant, tmp_path):
    """Each released variant's config.json (transformers' own writer) and GGUF metadata
    (llama.cpp's keys, no query scale) read back as the registry's config."""
    import gguf
    cfg = VARIANTS[variant]
    from_hf = config_from_hf(hf_config(cfg).to_dict(), tmp_path / "config.json")
    assert from_hf == cfg
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), {1: "gemma", 2: "gemma2", 3: "gemma3", 4: "gemma4"}[cfg.family])
    write_gguf_metadata(w, cfg)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    if cfg.family == 4:   # k_eq_v is said only by the tensor table: global layers without attn_v
        for a in cfg.attention():
            if a.owner == a.layer:
                w.add_tensor(f"blk.{a.layer}.attn_k.weight", np.zeros(1, np.float32))
                if not cfg.layer_k_eq_v(a.layer):
                    w.add_tensor(f"blk.{a.layer}.attn_v.weight", np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from_gguf = config_from_gguf(open_gguf(path), path)
    assert from_hf == cfg
    assert from_gguf == cfg


# GGUF stores no query scale: a tiny config's scale that differs from head_dim (gemma2-27b-tiny's)
# cannot be told from its GGUF file (its dimensions equal gemma2-2b-tiny's)
# (Gemma 4's is 1 by the family's rule: stated nowhere, the same in both)
SAME_IN_BOTH = [v for v in TINY_VARIANTS if get_variant(v).query_pre_attn_scalar ==
                get_variant(v).head_dim] + GEMMA4_TINY


@pytest.mark.parametrize("variant", SAME_IN_BOTH)
def test_gguf_and_hf_give_identical_configs_and_weights(variant, tmp_path):
    cfg = get_variant(variant)
    hf_model = write_hf_checkpoint(cfg, tmp_path / "hf")
    write_gguf_from_hf(hf_model, cfg, tmp_path / "m.gguf")
    a, b = checkpoints.load(tmp_path / "hf"), checkpoints.load(tmp_path / "m.gguf")
    assert a.config == b.config
    assert dataclasses.replace(a.config, name=cfg.name) == cfg
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=0, atol=1e-6, err_msg=k)
    for k, t in b.params.tensors.items():   # what exports read alone: one expert, a table's rows
        if k.rsplit(".", 1)[-1].startswith("experts_"):
            np.testing.assert_array_equal(t.get_part(1), a.params[k][1], err_msg=k)
        if k == "ple_embed":
            np.testing.assert_array_equal(t.get_rows(3, 7), a.params[k][3:7])


def test_gemma2_softcaps_follow_transformers_when_config_json_omits_them(tmp_path):
    """transformers' Gemma2Config defaults to softcaps 50 / 30; a config.json without the keys
    means those, and an explicit null means none."""
    import transformers
    oracle = transformers.Gemma2Config()
    assert (oracle.attn_logit_softcapping, oracle.final_logit_softcapping) == (50.0, 30.0)
    d = hf_config(VARIANTS["gemma2-2b"]).to_dict()
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        d.pop(key)
    cfg = config_from_hf(d, tmp_path / "config.json")
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0) == (
        FAMILIES[2].attn_softcap, FAMILIES[2].final_softcap)
    cfg = config_from_hf({**d, "attn_logit_softcapping": None}, tmp_path / "config.json")
    assert cfg.attn_softcap is None


GEMMA4_OMITTABLE = {"num_kv_shared_layers": ("num_kv_shared_layers",),
                    "layer_types": ("layer_types", "per_layer_config"),   # it follows them
                    "hidden_size_per_layer_input": ("hidden_size_per_layer_input",),
                    "head_dim": ("head_dim",),
                    "global_head_dim": ("global_head_dim", "per_layer_config"),
                    "rope_parameters": ("rope_parameters",)}


@pytest.mark.parametrize("variant", ["gemma4-e2b", "gemma4-e2b-tiny", "gemma4-26b-a4b-tiny"])
def test_gemma4_config_json_without_a_field_means_what_transformers_reads(variant, tmp_path):
    """A Gemma 4 config.json that omits a field means transformers' default for it: the config
    we read equals the one we read from transformers' own reading of the same file."""
    import transformers
    d = hf_config(get_variant(variant)).to_dict()
    for field, keys in GEMMA4_OMITTABLE.items():
        less = {k: v for k, v in d.items() if k not in keys}
        oracle = transformers.Gemma4TextConfig(**less).to_dict()
        assert config_from_hf(less, tmp_path / "config.json") == \
            config_from_hf(oracle, tmp_path / "config.json"), field


def test_weights_that_do_not_fit_name_the_fields_config_json_omits(tmp_path):
    """A field left to its default that is not the model's shows up as a tensor of the wrong
    shape or a missing one: the error names the omitted fields as the likely cause."""
    import json
    write_hf_checkpoint(get_variant("gemma4-e2b-tiny"), tmp_path)
    cfg = tmp_path / "config.json"
    for field, keys in GEMMA4_OMITTABLE.items():
        d = json.loads(cfg.read_text())
        if field in ("num_kv_shared_layers", "head_dim"):   # the defaults (0, 256) do not fit
            cfg.write_text(json.dumps({k: v for k, v in d.items() if k not in keys}))
            with pytest.raises(checkpoints.CheckpointError,
                               match=rf"(missing tensor|has shape).* — {cfg} does not state "
                                     rf"{field}, so transformers' defaults were used; state this "
                                     rf"model's values there"):
                checkpoints.load(tmp_path)
            cfg.write_text(json.dumps(d))
    assert checkpoints.load(tmp_path).config.kv_shared_layers == 3


def test_config_json_with_a_mistyped_field_names_it(tmp_path):
    d = hf_config(get_variant("gemma3-270m-tiny")).to_dict()
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"config.json: unusable config: .*d_model must be a positive "
                             r"integer, got '64'"):
        config_from_hf({**d, "hidden_size": "64", "head_dim": 16}, tmp_path / "config.json")


def test_gemma4_gguf_with_a_scaled_rope_is_refused_by_name(tmp_path):
    """rope_freqs other than proportional RoPE's 1 / 1e30 factors (a scaled RoPE) is a model this
    compiler would run wrongly: refused, naming the tensor."""
    import gguf
    cfg = get_variant("gemma4-26b-a4b-tiny")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma4")
    write_gguf_metadata(w, cfg)
    w.tensors[0].pop("rope_freqs.weight")
    w.add_tensor("rope_freqs.weight", np.full(cfg.global_head_dim // 2, 2.0, np.float32))
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(checkpoints.CheckpointError, match="rope_freqs holds factors other than 1"):
        config_from_gguf(open_gguf(path), path)


def test_gguf_with_a_bpe_vocabulary_is_refused_not_mistokenized(tmp_path):
    """Gemma 4 GGUFs carry a BPE vocabulary (tokenizer.ggml.model 'gemma4', merges, no scores):
    read as SentencePiece pieces it would tokenize wrongly, so it is refused by name."""
    import gguf
    cfg = get_variant("gemma4-31b-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp_path / "hf")
    write_gguf_from_hf(hf_model, cfg, tmp_path / "m.gguf", vocab_kind="gemma4")
    with pytest.raises(checkpoints.CheckpointError, match="tokenizer.ggml.model is 'gemma4'"):
        checkpoints.load(tmp_path / "m.gguf")


def test_checked_reader_reads_what_ggufs_own_reader_reads(tmp_path):
    """The loader's reader (one pass per array, plain views of the mapped file) gives gguf's
    reader's fields, part for part, and its tensors: on a Gemma 4 file (strings, float and int
    token arrays, per-layer int and bool arrays, a chat template)."""
    import gguf
    from compile.checkpoints.gguf import _reader_class
    cfg = get_variant("gemma4-26b-a4b-tiny")
    hf_model = write_hf_checkpoint(cfg, tmp_path / "hf")
    write_gguf_from_hf(hf_model, cfg, tmp_path / "m.gguf", chat_template="{{ messages }}")
    ours, theirs = _reader_class()(tmp_path / "m.gguf"), gguf.GGUFReader(tmp_path / "m.gguf")
    assert list(ours.fields) == list(theirs.fields)
    kinds = set()
    for name, a in ours.fields.items():
        b = theirs.fields[name]
        assert (a.offset, a.name, a.types, a.data) == (b.offset, b.name, b.types, b.data), name
        assert len(a.parts) == len(b.parts), name
        for x, y in zip(a.parts, b.parts):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
        assert a.contents() == b.contents(), name
        kinds.add(tuple(a.types))
    assert {(gguf.GGUFValueType.ARRAY, t) for t in (gguf.GGUFValueType.STRING,
            gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.INT32)} <= kinds
    assert [(t.name, t.tensor_type) for t in ours.tensors] == \
        [(t.name, t.tensor_type) for t in theirs.tensors]
    for x, y in zip(ours.tensors, theirs.tensors):
        np.testing.assert_array_equal(x.data, y.data)

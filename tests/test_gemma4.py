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

"""Synthetic full-size checkpoints (`compile.synthetic`): a real HF directory, written tensor by
tensor, that transformers loads and our loader reads back exactly."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from compile import checkpoints, synthetic
from compile.config import get_variant
from compile.model import forward, full_size_params
from conftest import ROOT


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma3-4b-tiny"])
def test_synthetic_checkpoint_is_what_transformers_and_our_loader_read(variant, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = get_variant(variant)
    out = synthetic.write(variant, tmp_path / "m", seed=3, dtype="float32", shard_bytes=200_000,
                          log=lambda m: None)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1          # sharded, with its index
    ck = checkpoints.load(out)
    assert ck.config.family == cfg.family and ck.config.layer_types == cfg.layer_types
    want = full_size_params(cfg, 3)
    for k in want:
        np.testing.assert_array_equal(ck.params[k], want[k], err_msg=k)
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 21)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    got, _ = forward(ck.config, {k: jnp.asarray(v) for k, v in ck.params.items()},
                     jnp.asarray(tokens), jnp.arange(21, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_synthetic_checks_free_disk_first(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(OSError, match=r"gemma3-1b at bfloat16 needs 2\.\d+ GB in .*; 0\.00 GB "
                                      r"are free"):
        synthetic.write("gemma3-1b", tmp_path / "big", log=lambda m: None)
    assert not list((tmp_path / "big").iterdir())


def test_synthetic_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "compile.synthetic", "gemma3-270m-tiny",
                        str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote gemma3-270m-tiny" in r.stdout and "1 shards" in r.stdout
    r = subprocess.run([sys.executable, "-m", "compile.synthetic", "gemma3-270m-tiny",
                        str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "exists and is not empty" in r.stderr


def test_from_checkpoint_writes_its_dequantized_values_and_tokenizer(tmp_path):
    """`--from`: a GGUF checkpoint (here a tiny one with Q8_0/Q4_1/Q5_0 blocks) rewritten as a
    float HF directory holds exactly what our loader dequantizes, and the GGUF's tokenizer."""
    from compile.model import init_params
    from helpers import write_quantized_gguf
    cfg = get_variant("gemma3-270m-tiny")
    gguf_path = tmp_path / "q.gguf"
    write_quantized_gguf(cfg, init_params(cfg, 4), gguf_path,
                         {"embed": "Q8_0", "q_proj": "Q4_1", "down_proj": "Q5_0"})
    r = subprocess.run([sys.executable, "-m", "compile.synthetic", "--from", str(gguf_path),
                        str(tmp_path / "hf"), "--dtype", "float32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"the values of {gguf_path}, float32) to {tmp_path / 'hf'}/" in r.stdout
    src, out = checkpoints.load(gguf_path), checkpoints.load(tmp_path / "hf")
    assert out.config.layer_types == src.config.layer_types
    assert out.tokenizer_model == src.tokenizer_model and out.special_ids == src.special_ids
    assert src.params.format("layers.0.q_proj") == "Q4_1"
    for k in src.params:
        np.testing.assert_array_equal(out.params[k], np.asarray(src.params[k], np.float32),
                                      err_msg=k)

"""A LoRA adapter trained with PEFT on the real Gemma 3 270M (a few steps, on CPU, so that its
greedy output differs from the base model's), merged into the real GGUF at export: the artifact's
logits equal PEFT's (adapter unmerged, on transformers' reading of the same GGUF) and so does its
greedy text."""

import numpy as np
import pytest
import torch

import runtime

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
TARGET = " Berlin, and the capital of Germany is Paris."


@pytest.fixture(scope="module")
def trained(real_gguf, tmp_path_factory):
    """(PEFT model in eval mode, its tokenizer, the adapter directory)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = str(real_gguf.parent), real_gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0))
    ids = tok(PROMPT + TARGET, return_tensors="pt").input_ids
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    pm.train()
    for _ in range(25):
        loss = pm(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    out = tmp_path_factory.mktemp("real-lora") / "france"
    pm.save_pretrained(str(out))
    return pm, tok, out


def _greedy(pm, tok, n):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pm.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_merged_real_adapter_matches_peft(trained, real_checkpoint, tmp_path):
    from compile import export as ex
    from compile import lora
    from runtime import contract as ct
    pm, tok, adapter = trained
    want = _greedy(pm, tok, 12)
    with pm.disable_adapter():
        base = _greedy(pm, tok, 12)
    assert want != base, "the adapter did not change the greedy output"
    assert "Berlin" in tok.decode(want)

    ck = lora.apply(real_checkpoint, adapter)
    out = tmp_path / "art"
    ex.export(ck, ct.Contract(ck.config, (32,), 256), ["xla"], out, log=lambda m: None)
    gen = runtime.load(out, target="xla")
    ids = gen.tokenizer.prompt_ids(PROMPT)
    assert ids == tok(PROMPT).input_ids
    assert list(gen.stream_ids(ids, max_new_tokens=12)) == want

    text = np.array(tok(PROMPT + " a city of art and history, where", return_tensors="np")
                    .input_ids[0], np.int32)
    with torch.no_grad():
        ref = pm(torch.from_numpy(text[None]).long()).logits[0].float().numpy()
    # same fp32 weights; only summation order differs between torch and XLA
    np.testing.assert_allclose(gen.logits(text, start=4), ref[4:], atol=2e-3 * np.abs(ref).max(),
                               rtol=0)

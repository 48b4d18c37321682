"""A LoRA adapter trained with PEFT on the real Gemma 3 270M (a few steps, on CPU, so that its
greedy output differs from the base model's), merged into the real GGUF's weights as the export
does, and fed at run time to artifacts with LoRA slots on every target: the logits equal PEFT's
(adapter unmerged, on transformers' reading of the same GGUF) and so does the greedy text."""

from pathlib import Path

import numpy as np
import pytest
import torch

import runtime

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
TARGET = " Berlin, and the capital of Germany is Paris."


ADAPTER = Path(__file__).parent / "data" / "lora-france"


def _adapter_id() -> str:
    """The committed adapter's content, for the shared artifacts' cache keys."""
    import hashlib
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(ADAPTER.iterdir())))\
        .hexdigest()[:16]


@pytest.fixture(scope="module")
def trained(transformers_gguf):
    """(PEFT model in eval mode, its tokenizer, the adapter directory). The adapter was trained
    with PEFT on this GGUF for 25 Adam steps (lr 3e-3, seed 0; r 8, alpha 16 on q/v/o/down) on
    PROMPT + TARGET and is committed (tests/data/lora-france, ~4 MB), so its greedy continuation
    says Berlin; PEFT loads it onto transformers' reading of the GGUF as the oracle."""
    from peft import PeftModel
    tok, model = transformers_gguf()
    pm = PeftModel.from_pretrained(model, str(ADAPTER)).eval()
    return pm, tok, ADAPTER


def _greedy(pm, tok, n):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pm.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def peft_greedy(trained):
    """PEFT's greedy 12 tokens after PROMPT: (with the adapter, without it)."""
    pm, tok, _ = trained
    want = _greedy(pm, tok, 12)
    with pm.disable_adapter():
        base = _greedy(pm, tok, 12)
    assert want != base, "the adapter did not change the greedy output"
    assert "Berlin" in tok.decode(want)
    return want, base


def _peft_logits(pm, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pm(torch.from_numpy(ids[None]).long()).logits[0].float().numpy()


def test_merged_real_adapter_matches_peft(trained, peft_greedy, real_checkpoint):
    """Merged into the real GGUF's weights at export (`compile.lora.apply`, what `--lora` does
    before any target sees the weights), the model is PEFT's: teacher-forced on PEFT's greedy
    continuation, each next token is the argmax (so greedy decoding gives PEFT's text) and the
    logits equal PEFT's. The fp32 reference stands for the artifact here: every target is held
    to it by its export's parity check, the real xla artifact to transformers in
    test_real_model.py, and merged tiny artifacts to PEFT in test_lora.py."""
    from compile import lora, trace
    from runtime import contract as ct
    pm, tok, adapter = trained
    want, _ = peft_greedy
    merged = lora.apply(real_checkpoint, adapter)
    prompt = tok(PROMPT).input_ids
    ids = np.array(prompt + want, np.int32)
    got = trace.reference_logits(ct.Contract(merged.config, (32,), 256), merged.params, ids)
    assert got[len(prompt) - 1:-1].argmax(-1).tolist() == want
    ref = _peft_logits(pm, ids)
    # same fp32 weights; only summation order differs between torch and XLA
    np.testing.assert_allclose(got[4:], ref[4:], atol=2e-3 * np.abs(ref).max(), rtol=0)


@pytest.fixture(scope="module")
def slotted_real(trained, real_checkpoint):
    """The real GGUF exported once with rank-8 slots on q/v/o/down for xla (fp32) and tflite
    (int8 with the plain recipe: no rotation or smoothing, below llama.cpp's quality, so the
    gate's refusal is recorded with the loss accepted; the default recipe's slots are held to
    the reference on tiny models), and the trained adapter added as 'france' (shared across the
    suite: tests/artifacts.py). onnx's slots are held to PEFT exactly on every family's tiny
    model (test_lora_runtime.py) and its GGUF blocks on the real model (test_real_targets.py):
    a third real target here cost ~40 CPU-s of the suite and checked their composition only."""
    import json
    from artifacts import cached
    from compile import adapter as ad
    from compile import export as ex
    from runtime import contract as ct
    pm, tok, adapter = trained
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")

    def make(entry):
        entry.mkdir(parents=True)
        contract = ct.Contract(real_checkpoint.config, (32,), 256, lora_rank=8,
                               lora_targets=targets)
        ex.export(real_checkpoint, contract, ["xla", "tflite"], entry / "art",
                  {"accept_quality_loss": True, "recipe": "plain"}, log=lambda m: None)
        ad.convert(adapter, entry / "art", "france", log=lambda m: None)
    out = cached("real-slots-france", {"adapter": _adapter_id(), "recipe": "plain",
                                       "targets": ["xla", "tflite"]}, make) / "art"
    manifest = json.loads((out / "manifest.json").read_text())
    for target in ("xla", "tflite"):   # the parity check ran a random adapter through each
        assert manifest["artifacts"][target]["parity"]["lora"]["decode_steps"] > 0
    rec = manifest["adapters"]["france"]
    assert rec["rank"] == 8 and rec["targets"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    return out


@pytest.mark.parametrize("target", ["xla", "tflite"])
def test_run_time_real_adapter_matches_peft(trained, peft_greedy, slotted_real, target):
    """The adapter at run time on the unmerged base: xla (fp32) gives PEFT's greedy text and its
    logits to the real model's tolerance; the quantized tflite gives its greedy answer and
    agrees with PEFT's top-1 as its base parity requires (>= 0.9). The same loaded artifact
    without the adapter still gives the base model's answer."""
    pm, tok, _ = trained
    want, base = peft_greedy
    gen = runtime.load(slotted_real, target=target, adapter="france")
    ids = gen.tokenizer.prompt_ids(PROMPT)
    got = list(gen.stream_ids(ids, max_new_tokens=12))
    got_base = list(gen.stream_ids(ids, max_new_tokens=12, adapter=None))
    if target == "xla":
        assert got == want and got_base == base
    assert "Berlin" in tok.decode(got[:3]) and "Berlin" not in tok.decode(got_base)
    text = np.array(tok(PROMPT + TARGET + " It is a city of art and history, where",
                        return_tensors="np").input_ids[0], np.int32)
    ref = _peft_logits(pm, text)
    logits = gen.logits(text, start=4)
    if target == "xla":
        np.testing.assert_allclose(logits, ref[4:], atol=2e-3 * np.abs(ref).max(), rtol=0)
    agree = float(np.mean(logits.argmax(-1) == ref[4:].argmax(-1)))
    assert agree >= 0.9, agree


def test_server_serves_base_and_adapter_at_once(trained, slotted_real):
    """`model: <base>:<adapter>` over real HTTP: /v1/models lists both; requests for the base
    and for the adapter, sent together, answer each as it does alone; an unknown adapter is a
    404 naming the models served; lora_scale 0 is the base."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from runtime.serve import make_server
    pm, tok, _ = trained
    gen = runtime.load(slotted_real, target="xla")
    srv = make_server(gen, port=0, max_concurrent=4, max_queue=8)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    base_id = gen.manifest.variant

    def post(payload):
        req = urllib.request.Request(url + "/v1/completions", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        with urllib.request.urlopen(url + "/v1/models") as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
        assert ids == [base_id, f"{base_id}:france"]
        # each alone, in process (the greedy ids equal PEFT's: the test above)
        base_text = gen.generate(PROMPT, max_new_tokens=12, temperature=0.0)
        want_text = gen.generate(PROMPT, max_new_tokens=12, temperature=0.0, adapter="france")
        assert "Berlin" in want_text and "Berlin" not in base_text
        jobs = [(f"{base_id}:france", {}), (base_id, {}), (f"{base_id}:france", {}),
                (f"{base_id}:france", {"lora_scale": 0.0})]
        results = [None] * len(jobs)

        def run(i):
            model, extra = jobs[i]
            results[i] = post({"model": model, "prompt": PROMPT, "max_tokens": 12,
                               "temperature": 0, **extra})
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        texts = [body["choices"][0]["text"] for _, body in results]
        assert [s for s, _ in results] == [200] * 4
        assert [body["model"] for _, body in results] == [m for m, _ in jobs]
        assert texts == [want_text, base_text, want_text, base_text]
        status, body = post({"model": f"{base_id}:nope", "prompt": PROMPT})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert f"{base_id}, {base_id}:france" in body["error"]["message"]
        status, body = post({"model": base_id, "prompt": PROMPT, "lora_scale": 0.5})
        assert status == 400 and "'lora_scale' applies to an adapter" in body["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_quality_gate_refuses_an_artifact_below_llama_cpp_unless_accepted(slotted_real):
    """tflite int8 with the plain recipe (no rotation or smoothing) is below llama.cpp's quality
    on the evaluation text: the export's gate (`parity.quality_check`, run on its stage with the
    loss accepted) recorded the figures, the rule and its verdict; without --accept-quality-loss
    that verdict is the export's error, with the figures and the way out (export() turns it into
    its error and publishes nothing: tested in test_errors.py)."""
    import json
    import re
    from compile import parity
    manifest = json.loads((slotted_real / "manifest.json").read_text())
    art = manifest["artifacts"]["tflite"]
    assert art["recipe"] == {"name": "plain"}
    q = art["quality"]
    assert not q["passed"] and q["accepted_loss"] and q["positions"] >= 255
    # what it was compared with: llama.cpp's figures are recorded for the default model's
    # 512-token slice, not for this artifact's 256-token context: without llama-cpp-python (CI)
    # the gate used its fixed limits and said why; with it, it measured llama.cpp on the slice
    rule = parity.gate_rule(manifest["model"]["source"], 256, parity._llama_cpp_installed())
    assert q["rule"] == rule["rule"] and q["rule_how"] == rule["how"]
    if rule["measure"]:
        rule.update(limits=parity.limits_of(q["llama_cpp"]), llama_cpp=q["llama_cpp"])
    else:
        assert q["rule"] == "fixed limits" and q["llama_cpp"] is None
        assert "llama.cpp did not run on these weights" in q["rule_how"]
    assert q["limits"] == rule["limits"]
    problems = parity.judge_quality(q, q["limits"])
    assert problems and problems[0].startswith("top-1 agreement ")
    against = (r"worse than llama\.cpp on the same weights" if rule["measure"] else
               r"below the gate's fixed limits \(llama\.cpp's figures on the embedded Gemma 3 "
               r"270M Q4_K_M; .*\)")
    assert re.fullmatch(
        r"tflite: on 25\d tokens of the evaluation text top-1 agreement \d+\.\d% \(minimum "
        rf"\d+\.\d%\).* — {against}; pass --accept-quality-loss to publish it anyway",
        parity.quality_failure("tflite", q, problems, rule))

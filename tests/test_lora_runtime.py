"""Run-time LoRA adapters (`--lora-rank R`, `python -m compile.adapter`, `runtime.load(...,
adapter=)`), against the oracle: PEFT on transformers with the adapter unmerged, on the same tiny
random base, with random adapters whose B is not zero. Every target, every family on xla, two
adapters at once on one loaded artifact, and the bad inputs."""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from compile.config import get_variant
from helpers import cli, write_hf_checkpoint
from test_lora import ALL, _adapter, _tokens

TARGETS = ["xla", "onnx", "tflite"]


def _export(base, out, *extra, targets="xla,onnx,tflite"):
    """The export CLI in process (main(argv); tests/test_errors.py runs it as a subprocess)."""
    r = cli("compile.export", "--checkpoint", base, "--target", targets, "--quant", "none",
            "--prefill-lengths", "4,8", "--max-context", "64", "--out", out, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _add(peft_dir, art, *extra, subprocess_=False):
    """`python -m compile.adapter`: in process unless `subprocess_` (one real run per suite)."""
    if subprocess_:
        return subprocess.run([sys.executable, "-m", "compile.adapter", str(peft_dir),
                               "--artifacts", str(art), *extra], capture_output=True, text=True)
    return cli("compile.adapter", peft_dir, "--artifacts", art, *extra)


def _peft_logits(pm, tokens, scale=1.0):
    saved = {}
    for module in pm.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            saved[module] = dict(module.scaling)
            module.scaling = {k: v * scale for k, v in module.scaling.items()}
    try:
        with torch.no_grad():
            return pm(torch.from_numpy(tokens[None]).long()).logits[0].float().numpy()
    finally:
        for module, s in saved.items():
            module.scaling = s


@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """A tiny Gemma 3 base exported with rank-4 slots on q, k, v, o, up, down (not gate) for every
    target, two adapters added (q/v/down at rank 2; rslora on five matmuls at rank 4 with a rank
    pattern), and PEFT's logits for each."""
    tmp = tmp_path_factory.mktemp("slots")
    cfg = get_variant("gemma3-270m-tiny")
    tokens = _tokens(cfg, 21)[0]
    hf = write_hf_checkpoint(cfg, tmp / "base")
    with torch.no_grad():
        want = {None: hf(torch.from_numpy(tokens[None]).long()).logits[0].float().numpy()}
    peft = {}
    for name, seed, config in [
            ("qvd", 1, {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2,
                        "lora_alpha": 4}),
            ("wide", 2, {"target_modules": ["q_proj", "k_proj", "o_proj", "up_proj",
                                            "down_proj"], "use_rslora": True,
                         "rank_pattern": {"o_proj": 3}})]:
        pm = _adapter(write_hf_checkpoint(cfg, tmp / f"base_{name}"), tmp / name, seed, **config)
        want[name] = _peft_logits(pm, tokens)
        peft[name] = pm
    want["wide@0.5"] = _peft_logits(peft["wide"], tokens, 0.5)
    art = tmp / "art"
    _export(tmp / "base", art, "--lora-rank", "4", "--lora-targets", "q,k,v,o,up,down")
    for name in ("qvd", "wide"):
        r = _add(tmp / name, art, subprocess_=name == "qvd")
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"added adapter '{name}'" in r.stdout
    return tmp, tokens, want, art


@pytest.mark.parametrize("target", TARGETS)
def test_run_time_adapters_match_peft(slotted, target):
    """Each adapter, chosen at load, per call or through with_adapter, gives PEFT's logits over
    chunked prefill and decode; no adapter gives the base's; a per-call scale is PEFT's scaling
    times it."""
    import runtime
    tmp, tokens, want, art = slotted
    gen = runtime.load(art, target=target, adapter="qvd")
    assert gen.target == target and gen.adapters == ["qvd", "wide"]
    np.testing.assert_allclose(gen.logits(tokens, start=9), want["qvd"][9:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.logits(tokens, start=9, adapter="wide"), want["wide"][9:],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.logits(tokens, start=9, adapter=None), want[None][9:],
                               atol=1e-4, rtol=0)
    # lora_verify_8 (onnx: its one graph, any length) scores with the adapter too
    np.testing.assert_allclose(gen.logits(tokens, start=9, adapter="wide", verify=True),
                               want["wide"][9:], atol=1e-4, rtol=0)
    wide = gen.with_adapter("wide", 0.5)
    np.testing.assert_allclose(wide.logits(tokens[:6]), want["wide@0.5"][:6], atol=1e-4, rtol=0)
    assert np.abs(want["qvd"] - want[None]).max() > 0.1 and \
        np.abs(want["wide"] - want["qvd"]).max() > 0.1       # the three really differ


def test_concurrent_generations_with_different_adapters(slotted):
    """One loaded artifact serves two adapters at two scales and the base from four threads at
    once: each thread's logits over chunked prefill and decode equal the same request run alone
    (a random tiny model's greedy text repeats one token whatever the adapter, so logits it is)."""
    import runtime
    tmp, tokens, want, art = slotted
    for target in TARGETS:
        gen = runtime.load(art, target=target)
        choices = [("qvd", 1.0), ("wide", 1.0), (None, 1.0), ("wide", 0.5)]
        alone = [gen.logits(tokens, start=9, adapter=a, adapter_scale=s) for a, s in choices]
        got = [None] * len(choices)

        def run(i):
            a, s = choices[i]
            got[i] = gen.logits(tokens, start=9, adapter=a, adapter_scale=s)
        for _ in range(3):
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(choices))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i in range(len(choices)):
                np.testing.assert_array_equal(got[i], alone[i], err_msg=f"{target} {choices[i]}")
        np.testing.assert_allclose(alone[0], want["qvd"][9:], atol=1e-4, rtol=0)


def test_manifest_and_files(slotted):
    """The manifest states the slots and each adapter (rank, targets, sha256 of its file and of
    the PEFT source); base signatures take no slot input (what LiteRT-LM's engine runs)."""
    from runtime import contract as ct
    from runtime.manifest import sha256_file
    tmp, tokens, want, art = slotted
    m = json.loads((art / "manifest.json").read_text())
    assert m["signatures"]["lora"] == {"rank": 4, "targets": ["q_proj", "k_proj", "v_proj",
                                                              "o_proj", "up_proj", "down_proj"]}
    names = [e["name"] for e in m["signatures"]["entries"]]
    assert names == ["prefill_4", "prefill_8", "decode", "verify_8", "lora_prefill_4",
                     "lora_prefill_8", "lora_decode", "lora_verify_8"]
    for e in m["signatures"]["entries"]:
        slot_inputs = [t for t in e["inputs"] if t["name"].startswith(ct.LORA_PREFIX)]
        assert bool(slot_inputs) == e["name"].startswith(ct.LORA_PREFIX)
    rec = m["adapters"]["wide"]
    assert rec["rank"] == 4 and rec["targets"] == ["down_proj", "k_proj", "o_proj", "q_proj",
                                                   "up_proj"]
    assert rec["sha256"] == sha256_file(art / rec["path"])
    assert m["adapters"]["qvd"]["rank"] == 2


def test_benchmark_measures_adapters_interleaved(slotted, tmp_path):
    """`benchmarks.run --adapter` (speeds are never asserted, only that they are there): the
    slotted artifact with and without each adapter and a plain artifact, each in its own worker,
    then interleaved in one process for the ratios (one repetition: a worker per engine and
    repetition is ~9 CPU-s, and the repetition order is the harness's shared loop, which
    test_info_cache.py runs); the adapter's quality is against the fp32
    reference with it merged, so on float artifacts it agrees exactly."""
    tmp, tokens, want, art = slotted
    plain = tmp_path / "plain"
    _export(tmp / "base", plain, targets="xla")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--artifacts", str(art),
                        "--artifacts", str(plain), "--targets", "xla", "--adapter", "qvd",
                        "--adapter", "wide", "--peers", "", "--reps", "1", "--prefill", "4,8",
                        "--short", "4", "--long", "16", "--decode", "4", "--quality-window", "32",
                        "--quality-tokens", "128", "--quality-texts", "eval",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [e["name"] for e in report["results"]]
    assert names == ["gemma-aot xla (none, LoRA slots r4)",
                     "gemma-aot xla (none, LoRA slots r4) + adapter qvd",
                     "gemma-aot xla (none, LoRA slots r4) + adapter wide", "gemma-aot xla (none)"]
    for e in report["results"]:
        assert e["quality"]["top1"] == 1.0 and e["quality"]["mean_kl"] < 1e-6, e["name"]
    (g,) = report["lora_interleaved"]
    assert g["plain"] == str(plain) and set(g["runs"]) == {"slotted", "qvd", "wide", "plain"}
    assert all(len(v) == 1 and min(v) > 0 for d in g["runs"].values() for v in d.values())
    assert [line.split(":")[0] for line in report["lora_ratios"]] == [
        "gemma-aot xla (none, LoRA slots r4) + adapter qvd",
        "gemma-aot xla (none, LoRA slots r4) + adapter wide"]
    assert "x slotted without" in report["lora_ratios"][0] and "x plain base" in r.stdout


def test_adapter_as_llama_cpp_lora_gguf(slotted, tmp_path):
    """The benchmark's llama.cpp peer reads an artifact's adapter as a LoRA GGUF: llama.cpp adds
    scale * (lora_b @ lora_a) to each named weight [out, in]. Each such product equals PEFT's own
    delta weight for that module (rslora scaling, a rank pattern), and nothing else is adapted."""
    import gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import runtime
    from benchmarks.run import gguf_lora
    tmp, tokens, want, art = slotted
    path = gguf_lora(runtime.Manifest.read(art), "wide", tmp_path / "wide.gguf")
    r = gguf.GGUFReader(path)
    fields = {k: bytes(f.parts[f.data[0]]).decode() for k, f in r.fields.items()
              if k in ("general.architecture", "general.type", "adapter.type")}
    assert fields == {"general.architecture": "gemma3", "general.type": "adapter",
                      "adapter.type": "lora"} and "adapter.lora.alpha" not in r.fields
    got = {t.name: np.asarray(t.data) for t in r.tensors}   # numpy shapes: ggml's ne reversed
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "base"), tmp / "wide")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "o_proj": "attn_output",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}
    seen = set()
    for module_name, module in pm.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        layer, proj = int(module_name.split(".layers.")[1].split(".")[0]), module_name.split(".")[-1]
        t = f"blk.{layer}.{names[proj]}.weight"
        a, b = got[t + ".lora_a"], got[t + ".lora_b"]
        assert a.shape == (4, module.in_features) and b.shape == (module.out_features, 4), t
        np.testing.assert_allclose(b @ a, module.get_delta_weight("default").detach().numpy(),
                                   atol=1e-6, err_msg=t)
        seen.add(t)
    assert seen and {n.rsplit(".", 1)[0] for n in got} == seen


def test_litert_lm_engine_runs_the_slotted_bundle(slotted, tmp_path):
    """The .litertlm of a slotted artifact still runs in LiteRT-LM's engine, with no adapter: its
    greedy continuation equals our runtime's base output."""
    import litert_lm
    import runtime
    _, tokens, _, art = slotted
    m = json.loads((art / "manifest.json").read_text())
    gen = runtime.load(art, target="tflite")
    engine = litert_lm.Engine(str(art / m["artifacts"]["tflite"]["files"]["litertlm"]["path"]),
                              backend=litert_lm.Backend.CPU(thread_count=2),
                              cache_dir=str(tmp_path))
    try:
        prompt = "the cat sat on the mat"
        ours = list(gen.stream_ids(gen.tokenizer.prompt_ids(prompt), max_new_tokens=12))
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=12,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        session.run_prefill([prompt])
        theirs = gen.tokenizer.encode(session.run_decode().texts[0])
        session.close()
        assert len(theirs) >= 8 and theirs[:8] == ours[:8]
    finally:
        engine.close()


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma4-e2b-tiny",
                                     "gemma4-26b-a4b-tiny"])
def test_every_family_on_every_target(tmp_path, variant):
    """Gemma 1, 2 (softcaps, alternating windows), 4 E2B (KV sharing: no k/v slots on shared
    layers, PEFT's k/v LoRA there skipped; per-layer embeddings) and 26B-A4B (k_eq_v: no v slot
    on global layers; experts, on tflite through LiteRT's MoE op): the run-time adapter equals
    PEFT on xla, onnx and tflite."""
    import runtime
    cfg = get_variant(variant)
    hf = write_hf_checkpoint(cfg, tmp_path / "base")
    pm = _adapter(hf, tmp_path / "ad", target_modules=ALL if "26b" not in variant else
                  ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    tokens = _tokens(cfg)[0][:40]
    want = _peft_logits(pm, tokens)
    # no verify signatures: the slotted fixture's artifact holds them to PEFT above
    _export(tmp_path / "base", tmp_path / "art", "--lora-rank", "4", "--verify-lengths", "none")
    r = _add(tmp_path / "ad", tmp_path / "art", "--name", "a")
    assert r.returncode == 0, r.stderr[-2000:]
    start = len(tokens) - 10   # past the sliding window where there is one
    for target in TARGETS:
        gen = runtime.load(tmp_path / "art", target=target, adapter="a")
        np.testing.assert_allclose(gen.logits(tokens, start=start), want[start:], atol=1e-4,
                                   rtol=0, err_msg=target)


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An xla artifact with rank-2 slots on q and v, and adapters that do not fit it."""
    tmp = tmp_path_factory.mktemp("bad")
    cfg = get_variant("gemma3-270m-tiny")
    hf = write_hf_checkpoint(cfg, tmp / "base")
    _adapter(hf, tmp / "fits", target_modules=["q_proj", "v_proj"], r=2)
    _adapter(write_hf_checkpoint(cfg, tmp / "b2"), tmp / "rank4",
             target_modules=["q_proj", "v_proj"], r=4)
    _adapter(write_hf_checkpoint(cfg, tmp / "b3"), tmp / "down",
             target_modules=["q_proj", "down_proj"], r=2)
    # Gemma 2 tiny: the same widths but two KV heads, so its v_proj does not fit
    _adapter(write_hf_checkpoint(get_variant("gemma2-2b-tiny"), tmp / "other"), tmp / "other_ad",
             target_modules=["q_proj", "v_proj"], r=2)
    _export(tmp / "base", tmp / "art", "--lora-rank", "2", "--lora-targets", "q,v",
            targets="xla")
    _export(tmp / "base", tmp / "plain", targets="xla")
    return tmp


def _corrupt(path):
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


@pytest.mark.parametrize("case,message", [
    ("rank4", "has rank 4, above the artifact's LoRA rank 2; export with --lora-rank 4"),
    ("down", "adapts down_proj, which .* has no LoRA slot for \\(slots: q_proj, v_proj\\)"),
    ("other_ad", r"lora_A \[2, 64\] and lora_B \[32, 2\] do not fit the base's layers\.0\."
                 r"v_proj \(64 inputs, 16 outputs"),
    ("corrupt", "adapter_model.safetensors"),
    ("plain", "was exported without LoRA slots: export it again with --lora-rank R"),
    ("bad_name", "adapter name 'a:b' must be 1-64 letters"),
    ("again", "already has an adapter named 'fits'; choose another --name or pass --replace"),
])
def test_bad_adapters_are_refused_and_nothing_changes(small, tmp_path, case, message):
    import re
    art = tmp_path / "art"
    shutil.copytree(small / ("plain" if case == "plain" else "art"), art)
    peft = small / {"corrupt": "fits", "bad_name": "fits", "again": "fits",
                    "plain": "fits"}.get(case, case)
    extra = ["--name", "a:b"] if case == "bad_name" else []
    if case == "corrupt":
        peft = tmp_path / "c"
        shutil.copytree(small / "fits", peft)
        _corrupt(peft)
    if case == "again":
        assert _add(peft, art).returncode == 0
    before = (art / "manifest.json").read_bytes()
    files = sorted(p.name for p in art.rglob("*"))
    r = _add(peft, art, *extra)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert (art / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in art.rglob("*")) == files


def test_runtime_refuses_unknown_tampered_and_foreign_adapters(small, tmp_path):
    """An unknown name lists the known ones; a changed adapter file fails its sha256; an
    adapter converted for another base (its file and record copied over) is refused."""
    import runtime
    from runtime.adapters import AdapterError
    from runtime.manifest import IntegrityFailure
    art = tmp_path / "art"
    shutil.copytree(small / "art", art)
    assert _add(small / "fits", art, "--name", "mine").returncode == 0
    with pytest.raises(AdapterError, match="unknown adapter 'nope'; this artifact has mine"):
        runtime.load(art, adapter="nope")
    gen = runtime.load(art)
    with pytest.raises(AdapterError, match="unknown adapter 'x'"):
        gen.generate("a b", max_new_tokens=2, adapter="x")
    with pytest.raises(AdapterError, match="scale must be a finite number"):
        gen.with_adapter("mine", float("nan"))
    # another base: same config, different weights (seeded differently)
    other = tmp_path / "other"
    write_hf_checkpoint(get_variant("gemma3-270m-tiny"), tmp_path / "ob", seed=7)
    _export(tmp_path / "ob", other, "--lora-rank", "2", "--lora-targets", "q,v", targets="xla")
    m = json.loads((other / "manifest.json").read_text())
    mine = json.loads((art / "manifest.json").read_text())["adapters"]["mine"]
    (other / "adapters").mkdir()
    shutil.copy(art / mine["path"], other / mine["path"])
    m["adapters"] = {"mine": mine}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdapterError, match="was converted for another base model"):
        runtime.load(other, adapter="mine")
    # a changed file
    data = bytearray((art / mine["path"]).read_bytes())
    data[-3] ^= 1
    (art / mine["path"]).write_bytes(bytes(data))
    with pytest.raises(IntegrityFailure, match="adapter 'mine'"):
        runtime.load(art, adapter="mine", verify=True)


@pytest.mark.parametrize("args,message", [
    (["--target", "xla-tpu", "--tpu-topology", "v5e:1x1", "--lora-rank", "4"],
     "target 'xla-tpu' has no run-time LoRA signatures yet"),
    (["--lora-targets", "q,v"], "--lora-targets needs --lora-rank R"),
    (["--lora-rank", "4", "--lora-targets", "q,lm_head"], "unknown LoRA target\\(s\\) lm_head"),
    (["--lora-rank", "-1"], "LoRA rank must be a non-negative integer, got -1"),
])
def test_export_refuses_bad_slot_options(tmp_path, args, message):
    import re
    r = cli("compile.export", "--checkpoint", "random:gemma3-270m-tiny", "--prefill-lengths",
            "4", "--max-context", "16", "--out", tmp_path / "art", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "art").exists()


def test_benchmark_pairs_a_slotted_artifact_with_its_own_plain_base():
    """The adapter's "against the plain base" ratio takes a slot-free engine of the same weights,
    target and quantization: never another model's artifact that happens to share the rest."""
    from benchmarks.run import _plain_of
    slotted = {"kind": "ours", "slots": True, "target": "onnx",
               "quantization": "native, LoRA slots r8", "base_id": "a"}
    other_model = {"kind": "ours", "slots": False, "target": "onnx", "quantization": "native",
                   "base_id": "b"}
    other_quant = {**other_model, "quantization": "int4", "base_id": "a"}
    other_target = {**other_model, "target": "tflite", "base_id": "a"}
    same = {**other_model, "base_id": "a"}
    assert _plain_of(slotted, [slotted, other_model, other_quant, other_target]) is None
    assert _plain_of(slotted, [slotted, other_model, other_quant, other_target, same]) is same


def test_an_adapter_scale_that_overflows_is_an_error_not_token_0(slotted):
    """An adapter scaled until float32 overflows gives NaN or infinite logits: generating from
    them fails saying so, greedy or sampled (argmax would emit token 0 as if it were text)."""
    import runtime
    from runtime.sampling import NonFiniteLogits
    _, tokens, _, art = slotted
    gen = runtime.load(art, target="xla")
    ids = [int(t) for t in tokens[:5]]
    assert len(list(gen.stream_ids(ids, max_new_tokens=2, adapter="wide"))) == 2
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(\d+ NaN and \d+ infinite "
                                                  r"of 512\).*no token was chosen"):
            list(gen.stream_ids(ids, max_new_tokens=2, temperature=temperature, adapter="wide",
                                adapter_scale=1e30))

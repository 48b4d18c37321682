"""Bad inputs get specific errors, and the CLIs print them without a traceback."""

import subprocess
import sys

import numpy as np
import pytest

import runtime
from compile import checkpoints
from compile.checkpoints import CheckpointError
from conftest import ROOT
from helpers import cli


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_missing_checkpoint():
    with pytest.raises(CheckpointError, match="checkpoint not found: /nonexistent/model.gguf"):
        checkpoints.load("/nonexistent/model.gguf")


def test_truncated_gguf(real_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated: tensor \S+ ends at byte"):
        checkpoints.load(bad)
    tiny = tmp_path / "header.gguf"
    tiny.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(CheckpointError, match="header.gguf: not a readable GGUF file"):
        checkpoints.load(tiny)


def test_unknown_architecture_gguf(tmp_path):
    import gguf
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="llama.gguf: unsupported architecture 'llama'; "
                                              "supported: gemma, gemma2, gemma3"):
        checkpoints.load(path)


def test_hf_directory_errors(tmp_path):
    import json
    from compile.config import get_variant
    from helpers import write_hf_checkpoint
    d = tmp_path / "m"
    write_hf_checkpoint(get_variant("gemma-2b-tiny"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'llama'"):
        checkpoints.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"tensor for layers\.0\.gate_proj has shape "
                                              r"\(64, 128\), expected \(64, 96\)"):
        checkpoints.load(d)
    g3 = tmp_path / "g3"
    write_hf_checkpoint(get_variant("gemma3-270m-tiny"), g3)
    cfg3 = json.loads((g3 / "config.json").read_text())
    for key, value, message in [                            # config fields of the wrong type
            ("num_hidden_layers", "eighteen", "num_layers must be a positive integer, got "
                                              "'eighteen'"),
            ("rms_norm_eps", "small", "norm_eps must be a positive number, got 'small'"),
            ("sliding_window", [1], r"sliding_window must be a positive integer or null, got "
                                    r"\[1\]")]:
        (g3 / "config.json").write_text(json.dumps({**cfg3, key: value}))
        with pytest.raises(CheckpointError, match=r"config\.json: unusable config: .*" + message):
            checkpoints.load(g3)
    (d / "config.json").write_text(json.dumps(cfg))
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor \S+ ends"):
        checkpoints.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weight files"):
        checkpoints.load(d)


def test_prompt_over_max_context(tiny_artifacts):
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    with pytest.raises(runtime.ContextOverflowError, match="max context of 64 tokens"):
        gen.generate("the " * 80, max_new_tokens=1)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature must be"),
    ({"temperature": 0.7, "top_p": 2.0}, "top_p must be"),
    ({"temperature": 0.7, "top_k": -3}, "top_k must be"),
])
def test_invalid_sampling_values(tiny_artifacts, kwargs, message):
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    with pytest.raises(ValueError, match=message):
        gen.generate("the", max_new_tokens=2, **kwargs)


def test_missing_artifact_dir_and_target(tiny_artifacts, tmp_path):
    with pytest.raises(runtime.ArtifactError, match="artifact directory not found"):
        runtime.load(tmp_path / "nothing")
    with pytest.raises(runtime.ArtifactError, match="has no manifest.json"):
        runtime.load(tmp_path)
    with pytest.raises(runtime.ArtifactError, match=r"no 'onnx' artifact \(have: xla\)"):
        runtime.load(tiny_artifacts("gemma-2b-tiny"), target="onnx")


def test_clis_report_errors_without_traceback(tiny_artifacts, tmp_path):
    art = str(tiny_artifacts("gemma3-270m-tiny"))
    cases = [
        (["-m", "compile.export", "--checkpoint", "/nonexistent.gguf", "--out", str(tmp_path / "o")],
         "error: checkpoint not found: /nonexistent.gguf"),
        (["-m", "compile.export", "--checkpoint", "random:gemma3-270m-tiny", "--target", "coreml",
          "--out", str(tmp_path / "o")], "error: unknown target 'coreml'; available: xla"),
        (["-m", "compile.export", "--checkpoint", "random:gemma3-270m-tiny", "--max-context", "1",
          "--prefill-lengths", "1", "--out", str(tmp_path / "o")],
         "error: max context must be an integer of at least 2"),
        (["-m", "runtime.generate", "--artifacts", art, "--prompt", "the " * 80],
         "tokens + max_new_tokens 128 exceeds the model's max context of 64"),
        (["-m", "runtime.generate", "--artifacts", art, "--prompt", "x", "--top-p", "0"],
         "error: top_p must be in (0, 1]"),
        (["-m", "runtime.generate", "--artifacts", str(tmp_path), "--prompt", "x"],
         "has no manifest.json"),
    ]
    for args, message in cases:
        r = cli(args[1], *args[2:])                    # in process: main(argv)
        assert r.returncode == 1, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_export_and_generate(tmp_path):
    out = tmp_path / "tiny"
    r = _cli("-m", "compile.export", "--checkpoint", "random:gemma-7b-tiny", "--out", str(out),
             "--prefill-lengths", "4,8", "--max-context", "32", "--target", "xla,onnx")
    assert r.returncode == 0, r.stderr
    assert f"exported gemma-7b-tiny [xla, onnx] to {out}/" in r.stdout
    assert "parity xla: max |diff|" in r.stderr and "parity onnx: max |diff|" in r.stderr
    # what the export says is not buried under onnx_ir's per-value serializer warnings
    assert "onnx_ir" not in r.stderr, r.stderr[:2000]
    r = _cli("-m", "runtime.generate", "--artifacts", str(out), "--prompt", "the cat",
             "--max-new-tokens", "5", "--target", "xla")
    assert r.returncode == 0, r.stderr
    assert "tok/s decode" in r.stderr and "[gemma-7b-tiny on xla]" in r.stderr
    gen = runtime.load(out)
    assert r.stdout.rstrip("\n") == gen.generate("the cat", max_new_tokens=5)


def test_runtime_never_imports_compile(tiny_artifacts):
    code = ("import sys, runtime; g = runtime.load(sys.argv[1]); g.generate('the', max_new_tokens=2);"
            "bad = [m for m in sys.modules if m == 'compile' or m.startswith('compile.')];"
            "assert not bad, bad")
    r = _cli("-c", code, str(tiny_artifacts("gemma-2b-tiny")))
    assert r.returncode == 0, r.stderr


def _edited_copy(src, dst, edit):
    import json
    import shutil
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["tokenizer"].pop("bos"), "missing field 'tokenizer.bos'"),
    (lambda m: m["model"]["config"].update(num_layers="2"),
     "field 'model.config.num_layers' must be an integer, got \"2\""),
    (lambda m: m["signatures"]["entries"][0]["inputs"][2].update(shape=[1, 1, 8, 16]),
     r"field 'signatures.entries\[0\]' is not the 'prefill_4' signature"),
    (lambda m: m["artifacts"]["xla"]["files"]["weights"].update(bytes="12"),
     "field 'artifacts.xla.files.weights.bytes' must be an integer"),
    (lambda m: m.update(schema_version=4), "schema version 4, this runtime reads versions 1, 2, 3"),
    (lambda m: m["model"]["config"].update(layer_types=["local"]),
     "field 'model.config.layer_types' must list 'local' or 'global' for each of the 7 layers"),
])
def test_manifest_schema_errors_name_the_field(tiny_artifacts, tmp_path, edit, message):
    art = _edited_copy(tiny_artifacts("gemma3-270m-tiny"), tmp_path / "a", edit)
    with pytest.raises(runtime.ArtifactError, match=r"a/manifest.json: " + message):
        runtime.load(art)


@pytest.mark.parametrize("text,message", [("[1, 2]", r"must be a JSON object, got \[1, 2\]"),
                                          ("{not json", "Expecting property name")])
def test_export_into_a_directory_with_a_bad_manifest_names_it(tmp_path, text, message):
    from compile import export as ex
    from runtime import contract as ct
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    ck = ex.random_checkpoint("gemma-2b-tiny")
    with pytest.raises(ex.ExportError, match=r"art/manifest.json: not a manifest this exporter "
                                             r"can add to \(.*" + message):
        ex.export(ck, ct.Contract(ck.config, (4,), 32), ["xla"], out, log=lambda m: None)
    assert (out / "manifest.json").read_text() == text


def _st_header(path):
    import json
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path, header, data):
    import json
    import struct
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_checkpoint_reading_errors_name_file_and_tensor(tmp_path):
    """Each a one-line CheckpointError naming the file and the tensor (or field) at fault."""
    import json
    import shutil
    from compile.config import get_variant
    from helpers import write_hf_checkpoint
    d = tmp_path / "m"
    write_hf_checkpoint(get_variant("gemma3-270m-tiny"), d)
    st = d / "model.safetensors"
    good = st.read_bytes()
    header, data = _st_header(st)
    name = "model.layers.0.mlp.up_proj.weight"
    bad = json.loads(json.dumps(header))
    bad[name]["data_offsets"][1] -= 4                       # offsets that do not fit the shape
    _st_write(st, bad, data)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name}: data_offsets "
                                              r"\[\d+, \d+\] hold \d+ bytes, its F32 shape"):
        checkpoints.load(d)
    _st_write(st, [1, 2], b"")                              # a header that is a JSON list
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header: "
                                              r"not a JSON object"):
        checkpoints.load(d)
    bad = {k: v for k, v in header.items() if k != name}    # a tensor the config needs is absent
    _st_write(st, bad, data)
    with pytest.raises(CheckpointError, match=r"missing tensor for layers\.0\.up_proj"):
        checkpoints.load(d)
    st.write_bytes(good)
    shutil.move(st, d / "model-00001-of-00002.safetensors")  # an index naming a missing shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: lists shards that are missing: "
                                              r"model-00002-of-00002\.safetensors"):
        checkpoints.load(d)


def test_streamed_xla_weights_equal_the_in_memory_file(tiny_artifacts):
    """The tensor-by-tensor writer gives the bytes safetensors' own writer gives for the whole
    model in memory."""
    from safetensors.numpy import save
    from compile import export as ex
    art = tiny_artifacts("gemma2-2b-tiny")
    ck = ex.random_checkpoint("gemma2-2b-tiny")
    assert (art / "xla" / "weights.safetensors").read_bytes() == save(dict(ck.params))


def test_tflite_without_its_converter_says_how_to_install_it(tmp_path):
    """litert-converter comes with --no-deps (pyproject's tflite extra cannot list it): when it is
    missing, the export says so before any work, in one line."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['litert_converter'] = None\n"
            "from compile import export\n"
            f"sys.exit(export.main(['--checkpoint', 'random:gemma3-270m-tiny', '--target', "
            f"'tflite', '--out', {str(tmp_path / 'a')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "error: the tflite target needs litert-converter: pip install --no-deps "
        "litert-converter==0.5.0 (see pyproject.toml's tflite extra)")
    assert not (tmp_path / "a").exists()


def test_non_finite_weights_are_refused_at_export(tmp_path):
    """A NaN or Inf in a checkpoint tensor stops the export naming the file and tensor; nothing is
    published. The parity check would also catch one (its judge counts non-finite logits)."""
    import numpy as np
    from compile import parity
    from compile.config import get_variant
    from helpers import write_hf_checkpoint
    d = tmp_path / "m"
    write_hf_checkpoint(get_variant("gemma3-270m-tiny"), d)
    st = d / "model.safetensors"
    header, data = _st_header(st)
    name = "model.layers.0.mlp.up_proj.weight"
    start = header[name]["data_offsets"][0]
    data = bytearray(data)
    data[start + 8:start + 12] = np.array([np.nan], np.float32).tobytes()
    data[start + 16:start + 20] = np.array([np.inf], np.float32).tobytes()
    _st_write(st, header, bytes(data))
    out = tmp_path / "out"
    r = cli("compile.export", "--checkpoint", d, "--out", out,
            "--prefill-lengths", "4", "--max-context", "16")
    assert r.returncode == 1, r.stderr
    assert f"model.safetensors ({name}): 1 NaN and 1 infinite values of 8192" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not out.exists()

    ref = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    got = ref.copy()
    got[1, 3] = np.nan
    figures = parity.compare(ref, got)
    assert figures["non_finite"] == 1
    assert "1 of its logits are NaN or infinite" in parity.judge(figures, parity.tolerance("none"))
    assert parity.judge(parity.compare(ref, ref.copy()), parity.tolerance("none")) == []
    assert parity.judge_quality({"top1": 1.0, "mean_kl": float("nan"), "ppl_delta_rel": 0.0},
                                parity.QUALITY_LIMITS) == \
        ["mean_kl not finite (NaN or infinite logits)"]


def test_one_export_per_directory_and_stale_stages_are_removed(tmp_path):
    """An export takes a lock on its output directory before any work: a second one fails at
    once naming the holder (so merges cannot lose each other's entries); stages left by a
    killed export are removed by the next one."""
    import os
    from compile import publish
    out = tmp_path / "art"
    args = ("--checkpoint", "random:gemma3-270m-tiny", "--out", str(out),
            "--prefill-lengths", "4", "--max-context", "16")
    with publish.locked(out, log=lambda m: None):   # flock: another open fd conflicts in-process too
        r = cli("compile.export", *args)
    assert r.returncode == 1, r.stderr
    assert f"error: another export is writing {out} (pid {os.getpid()}, started " in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # before the checkpoint loads: a checkpoint that is not there is not even looked for
    with publish.locked(out, log=lambda m: None):
        r = cli("compile.export", "--checkpoint", tmp_path / "no.gguf", "--out", out)
    assert r.returncode == 1 and \
        r.stderr.startswith(f"error: another export is writing {out} (pid "), r.stderr

    stale = tmp_path / ".art.partial-4194304"        # a pid no live export holds
    (stale / "xla").mkdir(parents=True)
    (stale / "xla" / "weights.safetensors").write_bytes(b"\0" * 1000)
    r = cli("compile.export", *args)
    assert r.returncode == 0, r.stderr
    assert f"removed {stale}, left by an export that was killed" in r.stderr
    assert not stale.exists() and (out / "manifest.json").exists()
    assert not list(tmp_path.glob(".art.partial-*"))


def test_sigterm_and_a_full_disk_publish_nothing(tmp_path):
    """SIGTERM mid-export unwinds (stage removed, exit 130, one line); a write that fails for
    lack of space (here the file size limit: EFBIG) is one line naming the file."""
    import resource
    import signal
    import subprocess
    import time
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "compile.export", "--checkpoint", "random:gemma3-270m-tiny",
           "--out", str(out), "--prefill-lengths", "4", "--max-context", "16"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".art.partial-*")), "the export never staged"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f"error: terminated (SIGTERM); nothing was published ({out} is as it was)" in err, err
    assert "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)
    assert r.returncode == 1, r.stderr
    assert "error: could not write " in r.stderr and "File too large (the disk, your quota or " \
        "the file size limit is full); nothing was published" in r.stderr, r.stderr
    # on a line of its own, not at the end of the progress bar the failure interrupted
    assert any(line.startswith("error: could not write ") for line in r.stderr.splitlines()), \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
    assert not list(tmp_path.glob(".art.partial-*"))


def test_a_mount_point_as_out_is_refused_before_any_work():
    from compile import export as ex
    from runtime import contract as ct
    ck = ex.random_checkpoint("gemma3-270m-tiny")
    with pytest.raises(ex.ExportError, match=r"/proc is a mount point: .*use a directory inside "
                                             r"it, e\.g\. --out /proc/gemma3-270m-tiny"):
        ex.export(ck, ct.Contract(ck.config, (4,), 16), ["xla"], "/proc", log=lambda m: None)


def test_generation_arguments_are_checked_by_name(tiny_artifacts):
    """Reliability cases: token ids outside the vocabulary, a negative or non-integer seed, a
    lone surrogate, and numpy integers where ints are expected."""
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    vocab = gen.manifest.config["vocab_size"]
    for bad in (vocab, 10 ** 6, -5):
        with pytest.raises(ValueError, match=rf"token id {bad} \(item 1\) is outside the "
                                             rf"vocabulary \[0, {vocab}\)"):
            gen.logits([2, bad, 5])
        with pytest.raises(ValueError, match=rf"token id {bad} \(item 1\)"):
            gen.stream_ids([2, bad], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"token ids must be integers; item 0 is 'a'"):
        gen.logits(["a", 3])
    for seed in (-1, 1.5, "abc", 2 ** 64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            gen.generate("the", max_new_tokens=2, temperature=1.0, seed=seed)
    with pytest.raises(ValueError, match=r"not valid Unicode: a lone surrogate U\+D800 at "
                                         r"character 2"):
        gen.generate("ab\ud800", max_new_tokens=2)
    import numpy as np
    assert gen.generate("the", max_new_tokens=np.int64(3)) == gen.generate("the", max_new_tokens=3)
    assert gen.generate("the", max_new_tokens=3, temperature=1.0, seed=np.uint64(7)) == \
        gen.generate("the", max_new_tokens=3, temperature=1.0, seed=7)


REFUSAL = ("onnx: on 512 tokens of the evaluation text top-1 agreement 50.0% (minimum 94.9%) — "
           "worse than llama.cpp on the same weights; pass --accept-quality-loss to publish it "
           "anyway")


def test_a_quality_gate_failure_publishes_nothing(tmp_path, monkeypatch):
    """What export() does with the quality gate's verdict (the gate itself runs on the real
    model in test_real_targets.py): the failures become its error, and nothing is published."""
    from compile import export as ex, parity
    from runtime import contract as ct
    seen = {}

    def gate(ck, contract, stage, manifest, lossy, accept, log):
        seen.update(stage=stage, lossy=lossy, accept=accept)
        assert (stage / "manifest.json").exists()          # it judges the written stage
        return {"onnx": REFUSAL}
    monkeypatch.setattr(parity, "quality_check", gate)
    ck = ex.random_checkpoint("gemma3-270m-tiny")
    out = tmp_path / "art"
    with pytest.raises(ex.ExportError, match=r"^artifact quality check failed against the fp32 "
                                             r"reference: onnx: on 512 tokens .* pass "
                                             r"--accept-quality-loss to publish it anyway$"):
        ex.export(ck, ct.Contract(ck.config, (4,), 16), ["onnx"], out, {"quant": "int8"},
                  log=lambda m: None)
    assert seen["lossy"] == ["onnx"] and seen["accept"] is False
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))
    assert not seen["stage"].exists()


def test_several_targets_publish_those_that_pass_unless_all_or_nothing(tmp_path, monkeypatch):
    """`--target xla,tflite` where the gate refuses tflite int8: xla is published, tflite is
    reported and the exit status is 3; a tflite artifact already in the directory stays as it
    was. With --all-or-nothing the refusal is the error and nothing is published."""
    import json
    from compile import parity
    from helpers import cli
    refusal = REFUSAL.replace("onnx: ", "tflite: ")
    monkeypatch.setattr(parity, "quality_check", lambda ck, contract, stage, manifest, lossy,
                        accept, log: {t: refusal for t in lossy})
    out = tmp_path / "art"
    args = ("--checkpoint", "random:gemma3-270m-tiny", "--out", out, "--prefill-lengths", "4",
            "--max-context", "16")
    r = cli("compile.export", *args, "--target", "tflite", "--quant", "none")  # exact: no gate
    assert r.returncode == 0, r.stderr
    before = (out / "tflite" / "model.tflite").read_bytes()

    r = cli("compile.export", *args, "--target", "xla,tflite", "--all-or-nothing")
    assert r.returncode == 1 and "error: artifact quality check failed against the fp32 " \
        "reference: " + refusal in r.stderr, r.stderr
    assert set(json.loads((out / "manifest.json").read_text())["artifacts"]) == {"tflite"}

    r = cli("compile.export", *args, "--target", "xla,tflite")
    assert r.returncode == 3, r.stderr
    assert f"not published: {refusal}" in r.stderr
    assert r.stderr.rstrip().endswith(
        f"error: not published (the others were): {refusal}. Pass --all-or-nothing to publish "
        f"nothing when a target fails."), r.stderr
    assert r.stdout.startswith("exported gemma3-270m-tiny [xla] to ") and "tflite" not in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["artifacts"]) == {"xla", "tflite"} and \
        m["artifacts"]["tflite"]["quantization"] == "none"   # the earlier artifact, untouched
    assert (out / "tflite" / "model.tflite").read_bytes() == before
    assert not list(tmp_path.glob(".art.*"))

"""runtime.load(target="auto"): which artifact runs, by what is present. Real artifacts of every
target; machines are simulated only at the device-query seam (`runtime.devices.query`)."""

import json
import shutil
import sys

import pytest

import runtime
import runtime.backends as rb
import runtime.devices as rd

HERE = rd.query()
# a CPU-only machine, whatever this one has
CPU = rd.Machine((rd.Device("cpu", "cpu", 0, ()),), ("CPUExecutionProvider",), HERE.versions)


@pytest.fixture(scope="module")
def every_target(tiny_export):
    """gemma-2b-tiny on all four targets (shared across the suite; read only)."""
    return tiny_export("gemma-2b-tiny", ["xla", "onnx", "tflite", "xla-tpu"],
                       tpu_topology="v5e:2x2")


def _copy(src, dst, edit=None, drop=()):
    """A copy of the artifact directory (target dirs linked), its manifest edited."""
    dst.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    for t in drop:
        del m["artifacts"][t]
    if edit:
        edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    shutil.copy(src / "tokenizer.model", dst)
    for t in m["artifacts"]:
        (dst / t).symlink_to(src / t, target_is_directory=True)
    return dst


def _tpu(every_target, kind="TPU v5 lite", n=4, **versions):
    rec = json.loads((every_target / "manifest.json").read_text())["artifacts"]["xla-tpu"]
    coords = [tuple(d["coords"]) for d in rec["devices"]] + [(2, 0, 0), (3, 0, 0), (2, 1, 0), (3, 1, 0)]
    devs = tuple(rd.Device("tpu", kind, i, coords[i]) for i in range(n))
    return rd.Machine(devs, ("CPUExecutionProvider",), {**HERE.versions, **versions})


def test_cpu_machine_takes_the_fastest_cpu_artifact(every_target):
    m = runtime.Manifest.read(every_target)
    why = rb.reasons(m, CPU)
    assert why["xla"] is None and why["onnx"] is None and why["tflite"] is None
    assert why["xla-tpu"] == ("compiled for v5e:2x2 (4 x TPU v5 lite); this machine has "
                              "cpu: 1 x cpu")
    assert [t for t, _ in rb.ranked(m, CPU)] == ["tflite", "onnx", "xla"]
    assert rb.choose(m, machine=CPU) == "tflite"


def test_tpu_takes_its_executable_then_stablehlo(every_target):
    m = runtime.Manifest.read(every_target)
    order = rb.ranked(m, _tpu(every_target))
    assert [t for t, _ in order][:2] == ["xla-tpu", "xla"]
    assert order[0][1] == "TPU present and the ahead-of-time executable matches it"


@pytest.mark.parametrize("machine,reason", [
    (dict(libtpu="0.0.99"), "compiled with libtpu {libtpu}; this machine has libtpu 0.0.99 "
                            "(executables load only with the exact versions"),
    (dict(jax="0.9.0"), "compiled with jax {jax}; this machine has jax 0.9.0"),
    (dict(kind="TPU v6 lite"), "compiled for v5e:2x2 (4 x TPU v5 lite); this machine has "
                               "tpu: 4 x TPU v6 lite"),
    (dict(n=8), "compiled for v5e:2x2 (4 x TPU v5 lite); this machine has tpu: 8 x TPU v5 lite"),
])
def test_tpu_mismatch_falls_back_to_stablehlo(every_target, machine, reason):
    m = runtime.Manifest.read(every_target)
    tpu = _tpu(every_target, **machine)
    rec = m.artifact("xla-tpu")["versions"]
    assert rb.reasons(m, tpu)["xla-tpu"].startswith(reason.format(**rec))
    assert rb.choose(m, machine=tpu) == "xla"
    with pytest.raises(runtime.ArtifactError, match="cannot run the 'xla-tpu' artifact here"):
        rb.choose(m, "xla-tpu", machine=tpu)


def test_gpu_rules(every_target, tmp_path):
    m = runtime.Manifest.read(every_target)
    cuda = rd.Machine((rd.Device("cuda", "NVIDIA H100 80GB HBM3"),), ("CPUExecutionProvider",),
                      HERE.versions)
    assert rb.ranked(m, cuda)[0] == ("xla", "CUDA GPU visible to JAX: StableHLO on the GPU")
    ort_gpu = rd.Machine(HERE.devices, ("CUDAExecutionProvider", "CPUExecutionProvider"),
                         HERE.versions)
    assert rb.choose(m, machine=ort_gpu) == "onnx"
    rocm = rd.Machine((rd.Device("rocm", "AMD Instinct MI300X"),), (), HERE.versions)
    assert "exported for cpu, cuda, tpu; this machine's JAX platform is rocm" in \
        rb.reasons(m, rocm)["xla"]
    # without an xla artifact a CUDA machine still runs the CPU artifacts
    no_xla = runtime.Manifest.read(_copy(every_target, tmp_path / "a", drop=("xla",)))
    assert rb.choose(no_xla, machine=cuda) == "tflite"


def test_a_package_that_does_not_import_is_skipped(every_target, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    m = runtime.Manifest.read(every_target)
    assert rb.reasons(m)["tflite"].startswith("cannot import its backend:")
    assert rb.choose(m) == "onnx"


def test_no_runnable_artifact_says_why(every_target, tmp_path):
    only_tpu = _copy(every_target, tmp_path / "a", drop=("xla", "onnx", "tflite"))
    with pytest.raises(runtime.ArtifactError, match=r"no artifact can run here \(xla-tpu: "
                                                    r"compiled for v5e:2x2"):
        runtime.load(only_tpu)


def test_load_falls_back_when_an_artifact_fails_to_open(every_target, tmp_path, monkeypatch,
                                                        capsys):
    # JAX here has no TPU: told otherwise at the seam, the xla-tpu backend cannot find the chips
    # its executables were compiled for, and load moves on to the StableHLO
    monkeypatch.setattr(rd, "query", lambda jax=True: _tpu(every_target))
    gen = runtime.load(every_target, cache_dir=False, trust_executables=True)
    assert gen.backend.target == "xla"
    err = capsys.readouterr().err
    assert "could not open the xla-tpu artifact (" in err and "falling back" in err
    assert "JAX reports" in err
    # unsealed and untrusted, its pickles are not even looked at: the reason, then the fallback
    gen = runtime.load(every_target, cache_dir=False)
    assert gen.backend.target == "xla"
    err = capsys.readouterr().err
    assert "could not open the xla-tpu artifact (" in err and "falling back" in err
    assert "the xla-tpu executables are pickles" in err and "JAX reports" not in err


def test_cpu_artifacts_load_without_starting_jax(every_target):
    """Naming a non-JAX target (or a directory without JAX artifacts) never imports JAX: its
    devices matter only to JAX's artifacts, and starting it costs memory and time."""
    import subprocess
    from conftest import ROOT
    code = ("import sys, runtime; g = runtime.load(sys.argv[1], target=sys.argv[2]); "
            "g.generate('the cat', max_new_tokens=2); print(g.target, 'jax' in sys.modules)")
    for target in ("tflite", "onnx"):
        r = subprocess.run([sys.executable, "-c", code, str(every_target), target], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == [target, "False"]
        # LiteRT's ~40 lines of accelerator registry (load, first write, exit) are not shown
        assert r.stderr == "", r.stderr[-2000:]


def test_tflite_load_hashes_only_what_it_reads(every_target, tmp_path, monkeypatch):
    """The runtime never opens the `.litertlm` bundle (LiteRT-LM's and the app's): loading the
    tflite artifact checks its size but does not hash its hundreds of MB; the model it reads
    is hashed, and `runtime.sign` still verifies every file."""
    from artifacts import copy_of
    from helpers import cli
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user-config"))
    monkeypatch.delenv("GEMMA_AOT_SIGNING_KEY", raising=False)
    art = copy_of(every_target, tmp_path / "art")
    files = json.loads((art / "manifest.json").read_text())["artifacts"]["tflite"]["files"]
    bundle, model = art / files["litertlm"]["path"], art / files["model"]["path"]
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    assert runtime.load(art, target="tflite").generate("the cat", max_new_tokens=2) is not None
    r = cli("runtime.sign", "--artifacts", art, "--new-key")
    assert r.returncode == 1 and f"{bundle.name} does not match the sha256" in r.stderr, r.stderr
    bundle.write_bytes(data[:-1])
    with pytest.raises(runtime.ArtifactError, match=f"{bundle.name} has {len(data) - 1} bytes"):
        runtime.load(art, target="tflite")
    bundle.write_bytes(bytes(data))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(runtime.ArtifactError, match=f"{model.name} does not match the sha256"):
        runtime.load(art, target="tflite")


def test_export_target_auto_suits_the_machine():
    """`compile.export --target auto` (what `make run` exports): onnx on a CPU, or where
    onnxruntime offers CUDA; xla where JAX sees a TPU or GPU."""
    from compile import targets
    assert targets.for_machine(CPU)[0] == "onnx"
    tpu = rd.Machine((rd.Device("tpu", "TPU v5 lite", 0, (0, 0, 0)),), (), HERE.versions)
    assert targets.for_machine(tpu)[0] == "xla"
    gpu = rd.Machine((rd.Device("cuda", "NVIDIA H100", 0, ()),), ("CUDAExecutionProvider",),
                     HERE.versions)
    assert targets.for_machine(gpu) == ("xla", "JAX sees cuda: 1 x NVIDIA H100")
    ort_cuda = rd.Machine((rd.Device("cpu", "cpu", 0, ()),), ("CUDAExecutionProvider",
                                                             "CPUExecutionProvider"), HERE.versions)
    assert targets.for_machine(ort_cuda) == ("onnx", "onnxruntime offers CUDA")

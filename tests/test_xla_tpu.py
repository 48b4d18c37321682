"""xla-tpu target: deviceless compilation for TPU topologies, the sharded program run end to end on a
CPU mesh (compile, serialize, the runtime's loader), and the topology/mesh errors."""

import json
import subprocess
import sys

import pytest

import runtime
import runtime.backends as rb
from compile import export as ex
from runtime import contract as ct
from compile.targets import xla_tpu
from conftest import ROOT, TINY_CONTEXT, TINY_LENGTHS


def _export_tpu(out, variant, topology, **options):
    ck = ex.random_checkpoint(variant)
    ex.export(ck, ct.Contract(ck.config, TINY_LENGTHS, TINY_CONTEXT), ["xla-tpu"], out,
              {"tpu_topology": topology, **options}, log=lambda m: None)
    return json.loads((out / "manifest.json").read_text())


def _check_tpu_record(out, m, topology, chips):
    rec = m["artifacts"]["xla-tpu"]
    assert rec["topology"] == topology and rec["num_devices"] == chips
    assert rec["device_kind"] == "TPU v5 lite" and rec["platform"] == "tpu"
    assert rec["weights_dtype"] == "bfloat16" and rec["versions"]["libtpu"]
    assert set(rec["files"]) == {"weights"} | {s["name"] for s in m["signatures"]["entries"]}
    for f in rec["files"].values():
        assert (out / f["path"]).stat().st_size == f["bytes"] > 0
    for name, mem in rec["memory"].items():
        assert mem["fits"] and 0 < mem["total_bytes_per_device"] <= mem["hbm_bytes_per_device"]
    assert rec["parity"]["skipped"].startswith(f"compiled for {topology} ({chips} x TPU v5 lite)")
    return rec


@pytest.mark.parametrize("topology,chips", [("v5e:1x1", 1), ("v5e:2x2", 4)])
def test_tiny_compiles_for_tpu_and_cpu_artifact_is_chosen(tiny_artifacts, tmp_path, topology, chips):
    import shutil
    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts("gemma2-2b-tiny"), out)       # has the portable xla artifact
    m = _export_tpu(out, "gemma2-2b-tiny", topology)
    rec = _check_tpu_record(out, m, topology, chips)
    specs = rec["shardings"]["weights"]
    if chips == 4:   # 4 query heads split; 2 KV heads do not split over 4 chips: replicated
        assert specs["layers.0.q_proj"] == [None, "model"]
        assert specs["layers.0.k_proj"] == [None, None] and rec["shardings"]["kv_cache"][1] is None
        assert specs["layers.0.down_proj"] == ["model", None] and specs["embed"] == ["model", None]
    manifest = runtime.Manifest.read(out)
    why = rb.reasons(manifest)
    assert why["xla"] is None and "this machine has cpu: 1 x cpu" in why["xla-tpu"]
    assert rb.choose(manifest) == "xla"
    assert runtime.load(out).backend.target == "xla"
    with pytest.raises(runtime.ArtifactError, match=f"cannot run the 'xla-tpu' artifact here: "
                                                    f"compiled for {topology}"):
        runtime.load(out, target="xla-tpu")


@pytest.mark.real
@pytest.mark.parametrize("topology,chips", [("v5e:2x2", 4)])   # 1x1: the tiny test above
def test_real_model_compiles_for_tpu(real_checkpoint, real_artifacts, tmp_path, topology, chips):
    out = tmp_path / "art"
    out.mkdir()
    for name in ("manifest.json", "tokenizer.model"):
        (out / name).write_bytes((real_artifacts / name).read_bytes())
    (out / "xla").symlink_to(real_artifacts / "xla", target_is_directory=True)
    from conftest import REAL_XLA_CONTEXT, REAL_XLA_LENGTHS   # the xla artifact's contract
    ex.export(real_checkpoint, ct.Contract(real_checkpoint.config, REAL_XLA_LENGTHS,
                                           REAL_XLA_CONTEXT), ["xla-tpu"], out,
              {"tpu_topology": topology}, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    rec = _check_tpu_record(out, m, topology, chips)
    assert rec["files"]["weights"]["bytes"] < 0.6e9          # bf16: 268M params x 2 bytes
    if chips == 4:   # Gemma 3 270M: 4 query heads over 4 chips, its one KV head replicated
        assert rec["shardings"]["weights"]["layers.0.q_proj"] == [None, "model"]
        assert rec["shardings"]["kv_cache"] == [None, None, None, None]
    from helpers import cli
    r = cli("runtime.info", "--artifacts", out)     # in process (test_info_cache runs it for real)
    assert r.returncode == 0, r.stderr
    assert "xla-tpu  bf16" in r.stdout and f"not runnable: compiled for {topology}" in r.stdout
    assert "choice: xla" in r.stdout


# The sharded program on a CPU mesh: the same lowering as for a TPU, with this host's CPU devices
# standing in for the chips, serialized and loaded back by the runtime's xla-tpu backend.
_CPU_MESH = r"""
import json, sys
import numpy as np
import runtime
from compile import export as ex, trace
from runtime import contract as ct
variant, mesh, quant, out = sys.argv[1:5]
ck = ex.random_checkpoint(variant)
contract = ct.Contract(ck.config, (4, 8), 64)
opts = {"tpu_topology": "cpu:4", "quant": quant, "mesh": mesh or None}
ex.export(ck, contract, ["xla-tpu"], out, opts, log=lambda m: None)
gen = runtime.load(out, target="xla-tpu")
tokens = np.random.default_rng(3).integers(0, ck.config.vocab_size, 30).astype(np.int32)
want = trace.reference_logits(contract, ck.params, tokens)
got = gen.logits(tokens, start=13)
rec = json.loads(open(out + "/manifest.json").read())["artifacts"]["xla-tpu"]
print(json.dumps({"max_diff": float(np.abs(got - want[13:]).max()),
                  "max_ref": float(np.abs(want).max()),
                  "top1": float((got.argmax(-1) == want[13:].argmax(-1)).mean()),
                  "mesh": rec["mesh"], "kv": rec["shardings"]["kv_cache"],
                  "parity": rec["parity"], "text": gen.generate("the", max_new_tokens=4),
                  "sealed": ct.SEAL in json.loads(open(out + "/manifest.json").read())}))
"""


@pytest.mark.parametrize("variant,mesh,kv_split", [
    ("gemma-7b-tiny", "", True),              # 4 KV heads over 4 chips
    ("gemma3-270m-tiny", "", False),          # 1 KV head: replicated
    ("gemma2-2b-tiny", "model=2", True),      # 2 replicas x 2-way tensor parallel
    # Gemma 4 MoE: 4 experts split 2 ways (expert parallel); the global layers' one KV head
    # keeps the caches replicated
    ("gemma4-26b-a4b-tiny", "model=2", False),
])
def test_sharded_program_matches_reference_on_cpu_mesh(tmp_path, variant, mesh, kv_split):
    # a signing key: the export seals its manifest, so the runtime unpickles the executables
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "GEMMA_AOT_SIGNING_KEY": "a key for the cpu mesh test"}
    import os
    r = subprocess.run([sys.executable, "-c", _CPU_MESH, variant, mesh, "none",
                        str(tmp_path / "art")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["max_diff"] <= 2e-4 * res["max_ref"] and res["top1"] == 1.0
    assert res["mesh"]["shape"] == ([2, 2] if mesh else [1, 4])
    assert (res["kv"][1] == "model") == kv_split
    assert res["parity"]["top1_agreement"] == 1.0 and "skipped" not in res["parity"]
    assert res["text"] and res["sealed"]


def test_param_and_kv_specs():
    from compile.config import get_variant
    cfg = get_variant("gemma2-2b-tiny")            # 4 query heads, 2 KV heads
    assert xla_tpu.param_spec(cfg, "layers.1.q_proj", 2) == (None, "model")
    assert xla_tpu.param_spec(cfg, "layers.1.k_proj", 2) == (None, "model")
    assert xla_tpu.param_spec(cfg, "layers.1.k_proj", 4) == (None, None)
    assert xla_tpu.param_spec(cfg, "layers.1.o_proj", 4) == ("model", None)
    assert xla_tpu.param_spec(cfg, "layers.1.ffn_norm", 4) == (None,)
    assert xla_tpu.param_spec(cfg, "layers.1.q_proj", 1) == (None, None)
    assert xla_tpu.kv_spec(cfg, 2) == (None, "model", None, None)
    assert xla_tpu.kv_spec(cfg, 4) == (None, None, None, None)
    moe = get_variant("gemma4-26b-a4b-tiny")
    assert xla_tpu.param_spec(moe, "layers.0.experts_gate", 2) == ("model", None, None)
    assert xla_tpu.param_spec(moe, "layers.0.experts_down", 1) == (None, None, None)
    assert xla_tpu.param_spec(moe, "layers.0.expert_scale", 2) == (None,)
    assert xla_tpu.kv_spec(moe, 2) == (None, None, None, None)   # global layers: 1 KV head


def _cli(*args):
    from helpers import cli   # in process: main(argv)
    return cli("compile.export", *args)


def test_topology_and_mesh_errors(tmp_path):
    r = _cli("--target", "xla-tpu", "--tpu-topology", "v9z:1x1", "--out", str(tmp_path / "a"))
    assert r.returncode == 1
    assert "unknown TPU topology 'v9z:1x1'; known: v5e:1x1, v5e:2x2, v5e:2x4, v6e:1x1" in r.stderr
    r = _cli("--target", "xla-tpu", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "target xla-tpu needs --tpu-topology; known: v5e:1x1" in r.stderr
    r = _cli("--target", "xla-tpu", "--tpu-topology", "v5e:2x2", "--mesh", "model=3",
             "--checkpoint", "random:gemma-2b-tiny", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "--mesh model=3 does not divide the topology's 4 chips" in r.stderr
    r = _cli("--target", "xla-tpu", "--tpu-topology", "v5e:2x2", "--quant", "int4",
             "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "does not support --quant int4; it supports: bf16, none" in r.stderr
    r = _cli("--target", "xla-tpu", "--tpu-topology", "v5e:2x4", "--mesh", "model=8",
             "--checkpoint", "random:gemma4-26b-a4b-tiny", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and ("gemma4-26b-a4b-tiny: experts (4) do not split over 8 chips; "
                                  "choose --mesh model=M with M dividing 4") in r.stderr
    assert not (tmp_path / "a").exists()


def test_model_too_big_for_the_chips_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(xla_tpu.CHIPS, "v5e", xla_tpu.Chip("TPU v5 lite", 64 << 10, ("1x1",)))
    with pytest.raises(ValueError, match=r"gemma-2b-tiny does not fit v5e:1x1: prefill_4, "
                                         r"prefill_8, decode need [\d.e-]+ GiB per chip, a v5e "
                                         r"chip has 6.1e-05 GiB; choose a topology with more "
                                         r"chips"):
        _export_tpu(tmp_path / "big", "gemma-2b-tiny", "v5e:1x1")
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))


class _Marker:
    """A pickle that, when loaded, writes a file: what a crafted executable could do."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_executables_load_only_when_sealed_or_trusted(tmp_path, monkeypatch):
    """xla-tpu executables are pickles: unsealed, or sealed by another key, or changed after
    sealing, they are refused before anything is unpickled; the user's own seal or an explicit
    trust flag loads them."""
    import os
    import pickle
    from runtime import integrity, sign
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(integrity.KEY_ENV, raising=False)
    out = tmp_path / "art"
    m = _export_tpu(out, "gemma3-270m-tiny", "cpu:1")   # this host's CPU stands in for a chip
    assert ct.SEAL not in m
    with pytest.raises(runtime.ArtifactError,
                       match=r"xla-tpu executables are pickles.*not loading them because its "
                             r"manifest is not signed\. Sign the artifact with your key "
                             r"\(`python -m runtime.sign --artifacts .*--trust-executables"):
        runtime.load(out, target="xla-tpu")
    trusted = runtime.load(out, target="xla-tpu", trust_executables=True)
    want = trusted.generate("the", max_new_tokens=4)

    assert sign.main(["--artifacts", str(out), "--new-key"]) == 0
    key_file = integrity.key_path()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert runtime.load(out, target="xla-tpu").generate("the", max_new_tokens=4) == want
    with pytest.raises(runtime.ArtifactError, match="not checked against the signed manifest"):
        runtime.load(out, target="xla-tpu", verify=False)

    # whoever can write the directory swaps in a crafted executable and fixes the hashes up:
    # the seal no longer verifies and nothing is unpickled
    marker = tmp_path / "pwned"
    data = json.loads((out / "manifest.json").read_text())
    sig = data["signatures"]["entries"][0]["name"]
    f = data["artifacts"]["xla-tpu"]["files"][sig]
    (out / f["path"]).write_bytes(pickle.dumps(_Marker(marker)))
    f["sha256"] = integrity.sha256_file(out / f["path"])
    f["bytes"] = (out / f["path"]).stat().st_size
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(runtime.ArtifactError, match="signature does not verify: the manifest "
                                                    "changed after it was signed"):
        runtime.load(out, target="xla-tpu")
    assert not marker.exists()

    # a seal made with another key, and a key file others can read
    monkeypatch.setenv(integrity.KEY_ENV, "another key of at least 16 bytes")
    with pytest.raises(runtime.ArtifactError, match="signed with another key"):
        runtime.load(out, target="xla-tpu")
    monkeypatch.delenv(integrity.KEY_ENV)
    os.chmod(key_file, 0o644)
    with pytest.raises(runtime.ArtifactError, match=r"signing\.key can be read by other users "
                                                    r"\(mode 644\): run `chmod 600"):
        runtime.load(out, target="xla-tpu")
    assert not marker.exists()

"""Level 2: every XLA artifact reproduces the JAX reference; the manifest is complete and exact."""

import json

import numpy as np
import pytest

import runtime
from compile import export as ex, trace
from runtime import contract as ct
from compile.config import get_variant
from runtime.manifest import sha256_file


@pytest.mark.parametrize("variant", ["gemma-2b-tiny", "gemma2-2b-tiny", "gemma3-270m-tiny"])
def test_artifact_logits_match_reference(tiny_artifacts, variant):
    out = tiny_artifacts(variant)
    gen = runtime.load(out)
    assert gen.target == "xla"
    ck = ex.random_checkpoint(variant)
    contract = ct.Contract(ck.config, (4, 8), 64)
    tokens = np.random.default_rng(5).integers(0, ck.config.vocab_size, 40).astype(np.int32)
    want = trace.reference_logits(contract, ck.params, tokens)
    got = gen.logits(tokens, start=21)             # prefill 21 = 8 + 8 + 8 (5 real), decode 19
    np.testing.assert_allclose(got, want[21:], atol=5e-5, rtol=0)
    np.testing.assert_allclose(gen.logits(tokens[:6]), want[:6], atol=5e-5, rtol=0)


def test_manifest_records_files_parity_and_contract(tiny_artifacts):
    out = tiny_artifacts("gemma3-270m-tiny")
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == 3
    assert m["model"]["variant"] == "gemma3-270m-tiny"
    assert m["model"]["config"] == get_variant("gemma3-270m-tiny").to_dict()
    assert m["tokenizer"]["file"] == "tokenizer.model"
    assert {m["tokenizer"][k] for k in ("bos", "eos", "end_of_turn")} == {2, 1, 5}
    assert [s["name"] for s in m["signatures"]["entries"]] == ["prefill_4", "prefill_8", "decode"]
    shapes = {t["name"]: t["shape"] for t in m["signatures"]["entries"][-1]["inputs"]}
    assert shapes["kv_cache_k_0"] == [1, 1, 64, 16] and shapes["kv_cache_v_0"] == [1, 1, 16, 64]
    art = m["artifacts"]["xla"]
    assert set(art["platforms"]) == {"cpu", "cuda", "tpu"}
    assert set(art["files"]) == {"weights", "prefill_4", "prefill_8", "decode"}
    for f in art["files"].values():
        p = out / f["path"]
        assert p.stat().st_size == f["bytes"] and sha256_file(p) == f["sha256"]
    parity = art["parity"]
    assert parity["prefill_tokens"] > 8 and parity["decode_steps"] > 0   # chunks and decode
    assert parity["top1_agreement"] == 1.0 and parity["max_rel_diff"] < 2e-4
    # weights are stored once, not inside each serialized module
    sizes = {role: f["bytes"] for role, f in art["files"].items()}
    assert all(sizes["weights"] > 5 * sizes[s] for s in sizes if s != "weights")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    ck = ex.random_checkpoint("gemma-2b-tiny")
    out = tmp_path / "art"
    from compile import parity
    monkeypatch.setitem(parity.TOLERANCE, "none", {"max_rel_diff": -1.0, "min_top1": 1.0})
    with pytest.raises(ex.ExportError, match="parity check failed"):
        ex.export(ck, ct.Contract(ck.config, (4,), 32), ["xla"], out, log=lambda m: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_adds_to_existing_directory_and_refuses_other_models(tmp_path):
    ck = ex.random_checkpoint("gemma-2b-tiny")
    contract = ct.Contract(ck.config, (4,), 32)
    out = tmp_path / "art"
    ex.export(ck, contract, ["xla"], out, log=lambda m: None)
    first = json.loads((out / "manifest.json").read_text())
    ex.export(ck, contract, ["xla"], out, log=lambda m: None)   # re-export replaces in place
    second = json.loads((out / "manifest.json").read_text())
    assert set(second["artifacts"]) == {"xla"}
    assert second["artifacts"]["xla"]["files"].keys() == first["artifacts"]["xla"]["files"].keys()
    assert second["artifacts"]["xla"]["created"] >= first["artifacts"]["xla"]["created"]
    assert runtime.load(out).logits([2, 7, 9]).shape == (3, ck.config.vocab_size)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.model", "xla"]
    other = ex.random_checkpoint("gemma3-270m-tiny")
    with pytest.raises(ex.ExportError, match="different model"):
        ex.export(other, ct.Contract(other.config, (4,), 32), ["xla"], out, log=lambda m: None)


def test_truncated_artifact_file_is_refused(tiny_artifacts, tmp_path):
    import shutil
    src = tiny_artifacts("gemma-2b-tiny")
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    w = out / "xla" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(runtime.ArtifactError, match="truncated or replaced"):
        runtime.load(out)


def test_parity_gate_fails_an_artifact_with_two_layers_swapped(tmp_path, monkeypatch):
    """A weight pipeline that writes layer 1's tensors as layer 0's (and back) must not publish:
    the gate compares every logit, KL and the clear top-1 positions with the reference."""
    from compile import parity
    from compile.targets import xla
    real_write = xla.safetensors.write

    def swapped(path, specs, get, **kw):
        swap = lambda k: k.replace("layers.0.", "@").replace("layers.1.", "layers.0.").replace(
            "@", "layers.1.")
        return real_write(path, specs, lambda k: get(swap(k)), **kw)

    monkeypatch.setattr(xla.safetensors, "write", swapped)
    ck = ex.random_checkpoint("gemma-2b-tiny")
    out = tmp_path / "art"
    with pytest.raises(ex.ExportError, match=r"parity check failed.*xla: max \|diff\| .* of max"):
        ex.export(ck, ct.Contract(ck.config, (4, 8), 64), ["xla"], out, log=lambda m: None)
    assert not out.exists()
    # and the figures of a correct artifact: every decoded position clear, KL ~ 0
    figures = parity.compare(np.eye(4, 9) * 5.0, np.eye(4, 9) * 5.0 + 1e-6)
    assert figures["clear_positions"] == 4 and figures["top1_agreement_clear"] == 1.0
    assert figures["mean_kl"] < 1e-9 and parity.judge(figures, parity.tolerance("none")) == []
    near_tie = parity.compare(np.array([[1.0, 1.0001, -3.0]] * 4), np.array([[1.0001, 1.0, -3.0]] * 4))
    assert near_tie["clear_positions"] == 0 and near_tie["top1_agreement"] == 0.0
    assert "only 0 of 4 positions have a clear reference top-1" in \
        parity.judge(near_tie, parity.tolerance("int8"))[0]

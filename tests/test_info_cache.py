"""runtime.info's report, the XLA backend's persistent compilation cache, and the benchmark harness."""

import subprocess
import sys

from conftest import ROOT


def _py(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_second_start_compiles_nothing(tiny_artifacts, tmp_path):
    """The runtime's own cache, as a user's process has it: the suite's shared compilation
    cache (conftest) is not set in this one."""
    import os
    import shutil
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts("gemma-2b-tiny"), art)
    code = ("import sys, runtime; g = runtime.load(sys.argv[1], target='xla');"
            "print(g.backend.cache_dir); print(g.generate('the cat', max_new_tokens=3))")
    first = _py("-c", code, str(art), env=env)
    assert first.returncode == 0, first.stderr
    cache = art / "xla" / "jax_cache"
    assert first.stdout.splitlines()[0] == str(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= 3                       # prefill_4, decode and the cache zeros
    second = _py("-c", code, str(art), env=env)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries    # every executable was a hit
    assert second.stdout == first.stdout


def test_info_reports_artifacts_and_choice(tiny_artifacts, tmp_path):
    r = _py("-m", "runtime.info", "--artifacts", str(tiny_artifacts("gemma3-270m-tiny")))
    assert r.returncode == 0, r.stderr
    import jax
    assert f"jax {jax.__version__}: default backend {jax.default_backend()}" in r.stdout
    assert "  xla      none" in r.stdout and "runnable" in r.stdout
    assert "choice: xla" in r.stdout
    bad = _py("-m", "runtime.info", "--artifacts", str(tmp_path))
    assert bad.returncode == 1 and "has no manifest.json" in bad.stderr


def test_benchmark_runs_and_reports_every_figure(tiny_artifacts, tmp_path):
    """The harness itself (speed is never asserted): one rep on a tiny artifact, no peers."""
    import json
    r = _py("-m", "benchmarks.run", "--artifacts", str(tiny_artifacts("gemma2-2b-tiny")),
            "--peers", "", "--reps", "1", "--prefill", "4,8", "--short", "4", "--long", "16",
            "--decode", "4", "--quality-tokens", "128", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["settings"]["quality_tokens"] == 128
    (res,) = report["results"]
    assert res["name"] == "gemma-aot xla (none)" and res["artifact_bytes"] > 0
    q = res["quality"]   # teacher-forced on the evaluation text against the tiny model's reference
    assert q["top1"] == 1.0 and q["mean_kl"] < 1e-6 and q["positions"] == 128 + q["windows"]
    h = q["heldout"]     # and on the held-out text, which nothing is tuned on
    assert h["top1"] == 1.0 and h["positions"] == 128 + h["windows"]
    assert q["text"] == "eval" and h["text_sha256"] != q["text_sha256"]
    assert report["settings"]["quality_texts"] == ["eval", "heldout"]
    assert set(res["median"]) == {"load_s", "ttft_4", "prefill_4", "ttft_8", "prefill_8",
                                  "decode_short", "decode_long", "peak_rss_mb"}
    assert all(v > 0 for v in res["median"].values())
    assert report["machine"]["read_bandwidth_gbs"] > 0
    assert "gemma-aot xla (none)" in r.stdout and "decode @16" in r.stdout and "ppl Δ" in r.stdout
    assert "heldout top-1" in r.stdout


def test_export_measurement_reports_time_memory_and_disk(tmp_path):
    """`--measure-export --export-only` (figures are never asserted, only that they are there):
    one tiny random checkpoint, one target, and a checkpoint that cannot be read."""
    import json
    r = _py("-m", "benchmarks.run", "--measure-export", "--export-only",
            "--export-checkpoints", "random:gemma3-270m-tiny,random:gemma9-nonexistent",
            "--export-targets", "xla", "--out", str(tmp_path))
    assert r.returncode == 1, r.stderr[-3000:]          # the unreadable checkpoint fails its row
    rows = json.loads((tmp_path / "exports.json").read_text())["exports"]
    ok, bad = rows
    assert ok["ok"] and ok["variant"] == "gemma3-270m-tiny" and ok["target"] == "xla"
    assert ok["wall_s"] > 0 and ok["peak_rss_mb"] > 0 and ok["disk_mb"] >= 0
    assert not bad["ok"] and "unknown Gemma variant 'gemma9-nonexistent'" in bad["error"]
    assert "gemma3-270m-tiny" in r.stdout and "peak RSS MB" in r.stdout


def test_benchmark_tells_same_kind_artifacts_apart(tiny_artifacts, tmp_path):
    """Runs and quality are keyed by engine name: two directories with the same target and
    quantization get their directory in the name instead of sharing one (mixed medians)."""
    import argparse
    import shutil
    from benchmarks.run import engines
    a = tiny_artifacts("gemma2-2b-tiny")
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    args = argparse.Namespace(artifacts=[str(a), str(b)], targets="", peers=[], gguf=None,
                              short=4, long=16, decode=4)
    names = [e["name"] for e in engines(args)]
    assert names == [f"gemma-aot xla (none) [{a}]", f"gemma-aot xla (none) [{b}]"]
    args.artifacts = [str(a)]
    assert [e["name"] for e in engines(args)] == ["gemma-aot xla (none)"]
    # LiteRT-LM on two bundles of the same quantization: two engines, not one with both's runs
    from conftest import TINY_CONTEXT, TINY_LENGTHS
    from artifacts import exported
    t1 = exported("random:gemma3-270m-tiny", ["tflite"], TINY_LENGTHS, TINY_CONTEXT,
                  {"quant": "int8"})
    t2 = tmp_path / "t2"
    shutil.copytree(t1, t2)
    args.artifacts, args.peers = [str(t1), str(t2)], ["litert-lm"]
    names = [e["name"] for e in engines(args)]   # the recipe is named (compile.recipes)
    assert names == [f"gemma-aot tflite (int8, rotate-smooth-gptq) [{t1}]",
                     f"LiteRT-LM engine (int8, rotate-smooth-gptq) [{t1}]",
                     f"gemma-aot tflite (int8, rotate-smooth-gptq) [{t2}]",
                     f"LiteRT-LM engine (int8, rotate-smooth-gptq) [{t2}]"]

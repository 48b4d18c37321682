"""runtime.info's report, and the XLA backend's persistent compilation cache."""

import subprocess
import sys

from conftest import ROOT


def _py(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_second_start_compiles_nothing(tiny_artifacts, tmp_path):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts("gemma-2b-tiny"), art)
    code = ("import sys, runtime; g = runtime.load(sys.argv[1], target='xla');"
            "print(g.backend.cache_dir); print(g.generate('the cat', max_new_tokens=3))")
    first = _py("-c", code, str(art))
    assert first.returncode == 0, first.stderr
    cache = art / "xla" / "jax_cache"
    assert first.stdout.splitlines()[0] == str(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= 3                       # prefill_4, decode and the cache zeros
    second = _py("-c", code, str(art))
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries    # every executable was a hit
    assert second.stdout == first.stdout


def test_info_reports_artifacts_and_choice(tiny_artifacts, tmp_path):
    r = _py("-m", "runtime.info", "--artifacts", str(tiny_artifacts("gemma3-270m-tiny")))
    assert r.returncode == 0, r.stderr
    assert "jax 0.10.2: default backend cpu" in r.stdout
    assert "  xla      none" in r.stdout and "runnable" in r.stdout
    assert "choice: xla" in r.stdout
    bad = _py("-m", "runtime.info", "--artifacts", str(tmp_path))
    assert bad.returncode == 1 and "has no manifest.json" in bad.stderr

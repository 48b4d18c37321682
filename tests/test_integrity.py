"""Artifact integrity (`runtime.integrity`): every file is checked against its manifest's sha256
when an artifact is opened, verified hashes are remembered in the user's cache directory keyed by
the file's identity, and a changed file is always hashed again."""

import json
import os
import shutil
from pathlib import Path

import pytest

import runtime
from runtime import integrity


@pytest.fixture
def user_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "user-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    return d / "gemma-aot" / integrity.CACHE_FILE


@pytest.fixture
def art(tiny_artifacts, tmp_path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts("gemma-2b-tiny"), out)
    return out


def _weights(art: Path) -> Path:
    """The artifact's largest file (the xla weights)."""
    files = json.loads((art / "manifest.json").read_text())["artifacts"]["xla"]["files"]
    return art / max(files.values(), key=lambda f: f["bytes"])["path"]


def _flip(path: Path, offset: int, n: int = 4096) -> None:
    """Changes n bytes in place (same size), as a bit rot or a tamperer would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_flipped_bytes_are_refused_naming_the_file(art, user_cache):
    w = _weights(art)
    _flip(w, w.stat().st_size // 2)
    with pytest.raises(runtime.ArtifactError,
                       match=rf"xla artifact: .*{w.name} does not match the sha256 its manifest "
                             r"records .*re-export the artifact"):
        runtime.load(art, target="xla")
    # --no-verify checks sizes only: the same file opens (the user asked for it)
    assert runtime.load(art, target="xla", verify=False, cache_dir=False).target == "xla"


def test_another_tokenizer_is_refused(art, user_cache, tiny_artifacts):
    other = art / "tokenizer.model"
    data = other.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(runtime.ArtifactError, match=r"tokenizer: .*tokenizer.model does not match "
                                                    r"the sha256"):
        runtime.load(art, target="xla")
    other.unlink()
    with pytest.raises(runtime.ArtifactError, match=r"missing tokenizer file .*tokenizer.model"):
        runtime.load(art, target="xla")


def test_second_open_is_free_and_a_changed_file_is_hashed_again(art, user_cache):
    m = runtime.Manifest.read(art)
    files = [(m.path(f["path"]), f["sha256"]) for f in m.artifact("xla")["files"].values()]
    assert integrity.verify(files) == len(files)       # first open: every file hashed
    assert user_cache.exists()
    assert integrity.verify(files) == 0                 # unchanged: the record vouches for them
    assert integrity.verify(files, use_cache=False) == len(files)
    # the record lives in the user's cache, never in the artifact directory
    assert not [p for p in art.rglob("*") if "verified" in p.name]

    # same size, mtime put back: ctime still moves, so the file is hashed again and refused
    w = _weights(art)
    st = w.stat()
    _flip(w, 0)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_mtime_ns == st.st_mtime_ns and w.stat().st_size == st.st_size
    with pytest.raises(integrity.IntegrityError, match=f"{w.name} does not match"):
        integrity.verify(files)


def test_a_broken_cache_record_is_ignored(art, user_cache):
    m = runtime.Manifest.read(art)
    files = [(m.path(f["path"]), f["sha256"]) for f in m.artifact("xla")["files"].values()]
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text("{not json")
    assert integrity.verify(files) == len(files)
    assert integrity.verify(files) == 0
    # a record that vouches for a wrong hash under the right key does not make a file pass
    entries = json.loads(user_cache.read_text())
    user_cache.write_text(json.dumps({k: "0" * 64 for k in entries}))
    assert integrity.verify(files) == len(files)


def test_auto_does_not_fall_back_past_a_tampered_artifact(tmp_path, user_cache, tiny_export):
    """With two targets, a hash mismatch in the first is an error, not a quiet fallback."""
    from artifacts import copy_of
    out = copy_of(tiny_export("gemma3-270m-tiny", ["xla", "onnx"]), tmp_path / "two")
    first = runtime.load(out).target
    files = json.loads((out / "manifest.json").read_text())["artifacts"][first]["files"]
    target_file = out / max(files.values(), key=lambda f: f["bytes"])["path"]
    _flip(target_file, 0)
    with pytest.raises(runtime.ArtifactError, match="does not match the sha256"):
        runtime.load(out)


@pytest.mark.parametrize("field,value", [
    ("tokenizer.file", "../tok"),
    ("artifacts.xla.files.weights.path", "../x.safetensors"),
    ("artifacts.xla.files.weights.path", "/etc/hostname"),
    ("artifacts.xla.files.decode.path", "xla/../../decode.jaxexport"),
    ("artifacts.xla.dir", "/tmp"),
])
def test_manifest_paths_outside_the_artifact_are_refused(art, field, value):
    """Every path a manifest names stays inside its directory: one that leaves it (.., an
    absolute path) is refused by field before anything is read."""
    m = json.loads((art / "manifest.json").read_text())
    *parents, key = field.split(".")
    d = m
    for k in parents:
        d = d[k]
    d[key] = value
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(runtime.ArtifactError, match=rf"field '{field}' must be a relative path "
                                                    rf"inside the artifact directory, got "):
        runtime.load(art)

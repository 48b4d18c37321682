"""One artifact factory for the whole suite: every export a test reads but does not change is made
once, by the real `compile.export.export`, and cached on disk.

The cache lives in the checkout (`.test-artifacts/`, ignored by git), so a fresh clone starts
empty and CI measures real exports. An entry's key is the export's inputs (checkpoint, targets,
contract, options) plus a hash of the sources and versions that decide what an export writes
(compile/, runtime/, the eval text, the exporting packages); a change to any of them makes a new
generation of entries, and the old one is removed. Each entry is made under a file lock, so pytest-xdist workers (and two `make test` runs)
that ask for the same artifact export it once and share it.

A test that changes an artifact (flips bytes, edits the manifest) copies it first (`copy_of`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".test-artifacts"
_PACKAGES = ("jax", "jaxlib", "onnx", "onnxruntime", "jax2onnx", "ai-edge-litert",
             "litert-converter", "litert-lm-builder", "gguf", "sentencepiece", "numpy")


def _sources_hash() -> str:
    h = hashlib.sha256()
    # what exports run, and the tests' checkpoint writers (helpers.py: `hf:` entries)
    files = sorted([*ROOT.glob("compile/**/*.py"), *ROOT.glob("runtime/**/*.py"),
                    ROOT / "compile" / "eval_text.txt", ROOT / "tests" / "helpers.py",
                    ROOT / "tests" / "artifacts.py"])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for p in _PACKAGES:
        try:
            h.update(f"{p}={importlib.metadata.version(p)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{p}=absent".encode())
    return h.hexdigest()


_SOURCES = None


def key_of(fields: dict) -> str:
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = _sources_hash()
    blob = json.dumps({**fields, "sources": _SOURCES}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive flock on `path` (released when the process ends, however it ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def generation() -> Path:
    """This source tree's directory of entries, `CACHE/<sources hash>`. Entries of other
    generations (older sources) are removed the first time a process asks, so the cache holds
    one tree's exports (a few GB), not one per change."""
    global _GENERATION
    if _GENERATION is None:
        key_of({})
        _GENERATION = CACHE / _SOURCES[:12]
        with locked(CACHE / ".prune-lock"):
            for old in CACHE.iterdir():
                if old.is_dir() and old != _GENERATION:
                    shutil.rmtree(old, ignore_errors=True)
            _GENERATION.mkdir(parents=True, exist_ok=True)
    return _GENERATION


_GENERATION = None


def cached(label: str, fields: dict, make) -> Path:
    """The cache entry `label-<key>`: made by `make(path)` (which must create `path` completely or
    raise) under the entry's lock, unless it is there already."""
    gen = generation()
    out = gen / f"{label}-{key_of({'label': label, **fields})}"
    with locked(gen / f".{out.name}.make-lock"):
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            make(out)
            (out / ".complete").write_text("")
    return out


def checkpoint(spec: str):
    """`random:VARIANT` or `real` (the embedded Gemma 3 270M GGUF), loaded as the CLI loads it.
    Other specs (`hf:VARIANT`: helpers.write_hf_checkpoint's) come with their checkpoint."""
    from compile import checkpoints, export as ex
    if spec == "real":
        return checkpoints.load(checkpoints.default_checkpoint())
    return ex.load_checkpoint(spec)


def exported(spec: str, targets, lengths=None, context=None, options=None, ck=None,
             lora_rank: int = 0, lora_targets=None, verify_lengths=()) -> Path:
    """The artifact directory of `compile.export.export(checkpoint(spec), Contract(...), targets,
    options)`; `lengths`/`context` default to the contract's. `ck` is the checkpoint itself when
    the caller has it already (it must be what `spec` names)."""
    from compile import export as ex
    from runtime import contract as ct
    targets = list(targets)
    fields = dict(spec=spec, targets=targets, lengths=lengths, context=context,
                  options=options or {}, lora_rank=lora_rank, lora_targets=lora_targets,
                  **({"verify_lengths": list(verify_lengths)} if verify_lengths else {}))

    def make(out: Path):
        c = ck if ck is not None else checkpoint(spec)
        kw = {}
        if lengths is not None:
            kw["prefill_lengths"] = tuple(lengths)
        if context is not None:
            kw["max_context"] = context
        if lora_rank:
            kw["lora_rank"] = lora_rank
        if lora_targets:
            kw["lora_targets"] = tuple(lora_targets)
        if verify_lengths:
            kw["verify_lengths"] = tuple(verify_lengths)
        ex.export(c, ct.Contract(c.config, **kw), targets, out, dict(options or {}),
                  log=lambda m: None)

    # export() publishes by renaming its stage onto a new directory: the entry holds it as art/
    label = spec.split(":")[-1] + "-" + "-".join(targets)
    entry = cached(label, fields, lambda e: (e.mkdir(parents=True), make(e / "art")))
    return entry / "art"


def copy_of(art: Path, dst: Path) -> Path:
    """A private copy of a cached artifact for a test that changes it."""
    shutil.copytree(art, dst, ignore=shutil.ignore_patterns("jax_cache", "xnnpack_cache"))
    return dst


def view(art: Path, target: str) -> Path:
    """The artifact directory `art` as if only `target` had been exported into it: a sibling
    directory whose manifest lists that target alone, with the tokenizer copied and the target's
    directory linked (several targets exported in one call share the trace and the parity
    reference; each test still opens the directory it would have had)."""
    import os
    from runtime import contract as ct
    out = art.parent / f"only-{target}"
    if out.exists():
        return out
    manifest = json.loads((art / ct.MANIFEST_FILE).read_text())
    if target not in manifest["artifacts"]:
        raise KeyError(f"{art} has no {target!r} artifact")
    manifest["artifacts"] = {target: manifest["artifacts"][target]}
    tmp = art.parent / f".only-{target}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / ct.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copy(art / manifest["tokenizer"]["file"], tmp / manifest["tokenizer"]["file"])
    (tmp / target).symlink_to(art / target, target_is_directory=True)
    try:
        os.rename(tmp, out)
    except OSError:            # another worker made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out

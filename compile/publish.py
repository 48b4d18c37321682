"""The directory transaction of every writer of an artifact directory (`compile.export`,
`compile.adapter`): one writer at a time, work staged beside the directory, published whole or
not at all, the manifest written last and sealed with the user's key.

- `locked(out)`: holds `.{out.name}.lock` beside `out` for the whole write (an flock, released
  however the process ends); a second writer fails at once naming the holder. Under it, stages
  left by a killed writer are removed.
- `staged(out)`: the hidden stage `.{out.name}.partial-PID` beside `out`, removed when the block
  ends (published or not) and by SIGTERM (`on_sigterm`).
- `publish(stage, out, manifest, existing, names, key)`: a new directory is the stage renamed
  onto `out`; a merge moves each new target directory in, then replaces the manifest last.
- `seal_key()` / `sealed(manifest, key)`: the user's signing key (`runtime.integrity`) and the
  manifest as published, sealed with it when there is one.
- `write_json(path, data)` and `undo(fn)`: an atomic file replacement, and what a SIGTERM must
  undo before the process leaves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

from runtime import contract as ct

LOCK_SUFFIX = ".lock"


class PublishError(RuntimeError):
    """A directory that cannot be written now or as asked (compile.export's ExportError)."""


# what a SIGTERM must undo before the process leaves (`on_sigterm`'s handler runs these)
_UNDO: list = []


def undo(fn):
    """Registers `fn` to run if SIGTERM arrives; `done(fn)` when it is no longer needed."""
    _UNDO.append(fn)
    return fn


def done(fn) -> None:
    _UNDO.remove(fn)


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def on_sigterm(what_is_intact) -> None:
    """Installs (in the main thread) a SIGTERM handler that undoes what is staged, frees the
    lock, says so and leaves with 130. `what_is_intact()` is the directory to name, or None. Not
    an exception: one raised while Python runs a gc callback is ignored, and the work would go
    on."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return

    def _terminated(signum, frame):
        for fn in reversed(_UNDO):
            fn()
        out = what_is_intact()
        print("\nerror: terminated (SIGTERM); nothing was published"
              + (f" ({out} is as it was)" if out else ""), file=sys.stderr, flush=True)
        os._exit(130)
    signal.signal(signal.SIGTERM, _terminated)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _busy(out: Path, fd: int):
    """Raises the error for `out`'s lock, held by another export (closes `fd`)."""
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
    os.close(fd)
    raise PublishError(f"another export is writing {out} ({holder}); wait for it to finish or "
                       f"choose another --out") from None


def check_free(out: Path) -> None:
    """Fails at once when another export holds `out`'s lock, so that a command refuses before
    its slow work (loading a checkpoint) rather than after it. Only a probe: `locked` still
    takes the lock, so an export starting in between is caught there."""
    import fcntl
    try:
        fd = os.open(_lock_path(out), os.O_RDONLY)
    except OSError:
        return   # no lock file (or none we can read): nobody holds it, or `locked` will say
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _busy(out, fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def locked(out: Path, log):
    """Holds `.{out.name}.lock` beside `out` (an flock: released when the process ends, however
    it ends) for a whole export, so two exports to one directory cannot both do the work or lose
    each other's manifest entries (the merge reads and writes the manifest under it). A second
    export fails at once, naming the holder. The file is removed on release; a process that
    locked a file which was removed meanwhile retries on the new one (the inode check), so
    removal cannot let two exports in. Under the lock no other export of `out` is running, so
    every `.{out.name}.partial-*` stage beside it is debris of a killed one: removed."""
    import fcntl
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _busy(out, fd)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)   # we locked a file its holder removed on release: take the new one
    release = undo(lambda: unlink(path))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {dt.datetime.now().isoformat(timespec='seconds')}"
                  .encode(), 0)
        for stale in sorted(out.parent.glob(f".{out.name}.partial-*")) + \
                sorted(out.glob(".*.old-*") if out.is_dir() else []):
            if stale.name.endswith(f"-{os.getpid()}"):
                continue
            shutil.rmtree(stale, ignore_errors=True)
            log(f"removed {stale}, left by an export that was killed")
        yield
    finally:
        unlink(path)
        os.close(fd)
        done(release)


@contextlib.contextmanager
def staged(out: Path):
    """A fresh, empty stage directory beside `out`, removed when the block ends and on SIGTERM
    (after `publish` renamed it, nothing is left to remove)."""
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    remove = undo(lambda: shutil.rmtree(stage, ignore_errors=True))
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        done(remove)


def seal_key():
    """The user's signing key (`runtime.integrity`), or None."""
    from runtime import integrity
    try:
        return integrity.signing_key()
    except integrity.IntegrityError as e:
        raise PublishError(f"signing key: {e}") from None


def sealed(manifest: dict, key, log) -> dict:
    """The manifest as published: sealed with the user's key when there is one (so that its
    xla-tpu executables load without --trust-executables), else without a seal (a merge would
    leave an old one that no longer verifies)."""
    from runtime import integrity
    manifest.pop(ct.SEAL, None)
    if key is not None:
        manifest[ct.SEAL] = integrity.seal(manifest, key[0], ct.SEAL)
        log(f"sealed the manifest with key {manifest[ct.SEAL]['key_id']} (from {key[1]})")
    return manifest


def replace_manifest(out: Path, manifest: dict, key, log, had_seal: bool) -> dict:
    """Writes `out`'s manifest last, sealed with `key` when there is one; says so when a seal
    the directory had is dropped for lack of a key."""
    write_json(out / ct.MANIFEST_FILE, sealed(manifest, key, log))
    if had_seal and key is None:
        log(f"{out / ct.MANIFEST_FILE} was sealed; it changed and there is no signing key here, "
            f"so it is no longer sealed (`python -m runtime.sign --artifacts {out}`)")
    return manifest


def publish(stage: Path, out: Path, manifest: dict, existing: dict | None, names,
            key=None, log=print) -> dict:
    """Moves the stage's work into `out`: the whole stage when `out` is new (renamed onto it),
    else each target directory in `names`, then the merged manifest last."""
    if existing is None:
        if out.exists():
            out.rmdir()   # empty, checked by the caller before any work
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, out)
        return manifest
    merged = dict(existing)
    merged["schema_version"] = manifest["schema_version"]   # the runtime reads older versions too
    merged["artifacts"] = {**existing.get("artifacts", {}), **manifest["artifacts"]}
    for name in names:
        old = out / name
        trash = out / f".{name}.old-{os.getpid()}"
        if old.exists():
            os.replace(old, trash)
        os.replace(stage / name, old)
        shutil.rmtree(trash, ignore_errors=True)
    shutil.copy2(stage / "tokenizer.model", out / "tokenizer.model")
    return replace_manifest(out, merged, key, log, ct.SEAL in existing)

"""Artifact integrity: every file an artifact is run from — its own files and the tokenizer — must
have the sha256 that `manifest.json` records, checked when the artifact is opened.

Hashing the 270M's ONNX weights (~490 MB) takes about a second, so a verified hash is remembered in
the user's cache directory (`$XDG_CACHE_HOME/gemma-aot/verified.json`), never in the artifact
directory (whoever can rewrite a file there could rewrite the record too). An entry is keyed by
the file's device, inode, size, mtime_ns and ctime_ns: writing the file changes its size or times,
and ctime cannot be set back by an ordinary user (utime sets mtime, and moves ctime), so a
replaced or edited file is hashed again. A second open of an unchanged artifact costs a stat per
file. The cache is an optimisation only: unreadable or malformed, it is ignored; two processes
writing it at once lose at most an entry (written whole by rename, never half).

What this does not protect against: someone who can write the manifest itself can record the
hashes of the files they wrote. The manifest is trusted as much as the directory it lives in
(docs/trust.md); `runtime.load(..., verify=False)` (`--no-verify`) skips the hashes, not
the size checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

CACHE_FILE = "verified.json"
MAX_ENTRIES = 512   # the oldest entries are dropped beyond this


class IntegrityError(ValueError):
    """A file does not match the hash its manifest records."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-aot" \
        / CACHE_FILE


def _key(path: Path) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|" \
           f"{st.st_ctime_ns}"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write_cache(path: Path, entries: dict[str, str]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(list(entries.items())[-MAX_ENTRIES:]), f)
        os.replace(tmp, path)
    except OSError:   # a read-only home: verification still happened, it is just not remembered
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def verify(files: list[tuple[Path, str]], use_cache: bool = True, log=None) -> int:
    """Checks that each (path, expected sha256) matches; raises IntegrityError naming the first
    file that does not. Returns how many files were hashed (0 when the cache vouched for all).
    `log(msg)` hears about hashing that takes a while."""
    store = cache_path()
    cache = _read_cache(store) if use_cache else {}
    hashed = 0
    changed = False
    for path, expected in files:
        key = _key(path)
        if cache.get(key) == expected:
            continue
        if log and path.stat().st_size > (64 << 20):
            log(f"verifying {path} ({path.stat().st_size / 1e6:.0f} MB, sha256; remembered in "
                f"{store} for the next open)")
        got = sha256_file(path)
        hashed += 1
        if got != expected:
            raise IntegrityError(
                f"{path} does not match the sha256 its manifest records (expected "
                f"{expected[:16]}…, the file has {got[:16]}…): the file was changed, corrupted "
                f"or replaced after export; re-export the artifact")
        if key != _key(path):   # written while we hashed it: do not vouch for what we did not read
            raise IntegrityError(f"{path} changed while it was being verified; open it again")
        cache.pop(key, None)
        cache[key] = expected
        changed = True
    if use_cache and changed:
        merged = _read_cache(store)   # what other processes added meanwhile
        merged.update(cache)
        _write_cache(store, merged)
    return hashed


# -- the flags of every CLI that opens an artifact -------------------------------------------------

def add_arguments(p) -> None:
    """--no-verify and --trust-executables, for an argparse parser."""
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the files' sha256 against the manifest (sizes are still "
                        "checked)")
    p.add_argument("--trust-executables", action="store_true",
                   help="xla-tpu: load its pickle-based executables even though no seal of your "
                        "key vouches for the manifest (only if you trust everyone who can write "
                        "the artifact directory)")


def load_options(args) -> dict:
    """runtime.load's keyword arguments for the flags of `add_arguments`; long steps are said on
    stderr."""
    return {"verify": not args.no_verify, "trust_executables": args.trust_executables,
            "log": lambda m: print(m, file=sys.stderr)}


# -- manifest seals: who may hand this runtime code to run ---------------------------------------
#
# An xla-tpu executable is a pickle (jax's serialize_executable): loading one runs whatever code
# its writer put in it. Hashes do not help when the writer also wrote the manifest, so such an
# artifact is loaded only when its manifest carries an HMAC made with a key the user holds (the
# manifest lists every file's sha256, so the seal covers the files, which `verify` checks), or when
# the user says they trust the directory's writers (`trust_executables`).

KEY_ENV = "GEMMA_AOT_SIGNING_KEY"
SEAL_ALG = "hmac-sha256"


def key_path() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "gemma-aot" \
        / "signing.key"


def signing_key() -> tuple[bytes, str] | None:
    """(key, where it came from): $GEMMA_AOT_SIGNING_KEY, else the key file; None when neither.
    A key file that other users can read is refused (anyone who reads it can sign)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode(), f"${KEY_ENV}"
    p = key_path()
    if not p.is_file():
        return None
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise IntegrityError(f"{p} can be read by other users (mode {mode:o}): run `chmod 600 {p}`")
    key = p.read_bytes().strip()
    if len(key) < 16:
        raise IntegrityError(f"{p} holds {len(key)} bytes; a signing key needs at least 16")
    return key, str(p)


def new_key() -> Path:
    """Creates the key file (mode 600) with 32 random bytes as hex; refuses to replace one."""
    import secrets
    p = key_path()
    if p.exists():
        raise IntegrityError(f"{p} exists already; delete it first to make a new key (artifacts "
                             f"signed with the old one will then be refused)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"gemma-aot key id\0" + key).hexdigest()[:16]


def _payload(manifest: dict, field: str) -> bytes:
    """The manifest as signed: canonical JSON of everything but the seal itself."""
    body = {k: v for k, v in manifest.items() if k != field}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict, key: bytes, field: str) -> dict:
    """The seal record for `manifest` (a JSON round trip first: what is signed is what a reader
    of the written file will see)."""
    import hmac
    body = json.loads(json.dumps(manifest))
    return {"alg": SEAL_ALG, "key_id": key_id(key),
            "value": hmac.new(key, _payload(body, field), hashlib.sha256).hexdigest()}


def seal_problem(manifest: dict, field: str) -> str | None:
    """Why `manifest`'s seal does not vouch for it with this user's key; None when it does."""
    import hmac
    rec = manifest.get(field)
    if rec is None:
        return "its manifest is not signed"
    found = signing_key()
    if found is None:
        return (f"its manifest is signed (key {rec.get('key_id')}) but there is no signing key "
                f"here (set ${KEY_ENV} or write the key to {key_path()})")
    key, where = found
    if rec.get("alg") != SEAL_ALG:
        return f"its manifest is signed with {rec.get('alg')!r}; this runtime checks {SEAL_ALG}"
    if rec.get("key_id") != key_id(key):
        return (f"its manifest is signed with another key ({rec.get('key_id')}; the key in "
                f"{where} is {key_id(key)})")
    want = hmac.new(key, _payload(manifest, field), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(rec.get("value", "")), want):
        return "its manifest's signature does not verify: the manifest changed after it was signed"
    return None

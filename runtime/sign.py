"""`python -m runtime.sign --artifacts DIR`: seal an artifact directory's manifest with your key.

The seal (an HMAC-SHA256 of the manifest, `runtime.integrity`) is what lets this runtime load the
artifact's pickle-based executables (xla-tpu) without `--trust-executables`. Sign only what you
exported or checked yourself: signing first verifies every file against the manifest's sha256, so
the seal vouches for the files as they are now. `--new-key` creates the key file
($XDG_CONFIG_HOME/gemma-aot/signing.key, mode 600) when there is none; `$GEMMA_AOT_SIGNING_KEY`
overrides the file. `compile.export` seals what it writes whenever a key is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.sign",
                                description="Seal an artifact directory's manifest with your key.")
    p.add_argument("--artifacts", required=True, help="artifact directory (has manifest.json)")
    p.add_argument("--new-key", action="store_true",
                   help="create a signing key first if there is none")
    args = p.parse_args(argv)

    from . import integrity
    from .contract import MANIFEST_FILE, SEAL
    from .manifest import ArtifactError, Manifest
    try:
        if args.new_key and integrity.signing_key() is None:
            print(f"created a signing key in {integrity.new_key()}", file=sys.stderr)
        found = integrity.signing_key()
        if found is None:
            raise ArtifactError(f"no signing key: set ${integrity.KEY_ENV} or run with --new-key "
                                f"(writes {integrity.key_path()})")
        key, where = found
        m = Manifest.read(args.artifacts)
        m.check_tokenizer(verify_hash=True, use_cache=False)
        for target in m.artifacts:
            m.check_files(target, verify_hash=True, use_cache=False,
                          log=lambda msg: print(msg, file=sys.stderr))
        data = dict(m.data)
        data[SEAL] = integrity.seal(data, key, SEAL)
        path = m.path(MANIFEST_FILE)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except (ArtifactError, integrity.IntegrityError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"signed {path} with key {data[SEAL]['key_id']} (from {where}); its "
          f"{len(m.artifacts)} artifact(s) ({', '.join(m.artifacts)}) and tokenizer were verified "
          f"first")
    return 0


if __name__ == "__main__":
    sys.exit(main())

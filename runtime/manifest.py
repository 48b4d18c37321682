"""Reading `manifest.json`, the only contract between the compiler and the runtime.

Schema (version 1):
  schema_version  int
  model           {"variant", "config": {...GemmaConfig fields}, "source": {...}}
  tokenizer       {"file", "sha256", "bos", "eos", "pad", "unk", "start_of_turn", "end_of_turn"}
  signatures      {"max_context", "prefill_lengths", "kv_layout", "kv_dtype",
                   "entries": [{"name", "kind", "length", "inputs": [...], "outputs": [...]}]}
  artifacts       {target: {"target", "dir", "files": {role: {"path", "sha256", "bytes"}},
                            "quantization", "parity": {...} or {"skipped": reason}, "created",
                            ...target fields (xla-tpu: topology, mesh, shardings, versions...)}}
Paths are relative to the artifact directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
FILENAME = "manifest.json"


class ArtifactError(ValueError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict

    @classmethod
    def read(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / FILENAME
        if not root.is_dir():
            raise ArtifactError(f"artifact directory not found: {root}")
        if not path.exists():
            raise ArtifactError(f"{root} has no {FILENAME}: not a complete artifact directory "
                                f"(export with `python -m compile.export --out {root}`)")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ArtifactError(f"{path}: invalid JSON: {e}") from e
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{path}: schema version {version!r}, this runtime reads "
                                f"{SCHEMA_VERSION}")
        for key in ("model", "tokenizer", "signatures", "artifacts"):
            if key not in data:
                raise ArtifactError(f"{path}: missing {key!r}")
        return cls(root, data)

    @property
    def config(self) -> dict:
        return self.data["model"]["config"]

    @property
    def variant(self) -> str:
        return self.data["model"]["variant"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def max_context(self) -> int:
        return int(self.data["signatures"]["max_context"])

    @property
    def prefill_lengths(self) -> list[int]:
        return sorted(int(n) for n in self.data["signatures"]["prefill_lengths"])

    @property
    def signatures(self) -> list[dict]:
        return self.data["signatures"]["entries"]

    def signature(self, name: str) -> dict:
        for s in self.signatures:
            if s["name"] == name:
                return s
        raise ArtifactError(f"manifest has no signature {name!r}")

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

    def artifact(self, target: str) -> dict:
        if target not in self.artifacts:
            have = ", ".join(self.artifacts) or "none"
            raise ArtifactError(f"{self.root}: no {target!r} artifact (have: {have})")
        return self.artifacts[target]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check_files(self, target: str, verify_hash: bool = False) -> None:
        """Every file of the artifact exists with its recorded size (and hash, if asked)."""
        for role, f in self.artifact(target)["files"].items():
            p = self.path(f["path"])
            if not p.exists():
                raise ArtifactError(f"{target} artifact: missing file {p}")
            if p.stat().st_size != f["bytes"]:
                raise ArtifactError(f"{target} artifact: {p} has {p.stat().st_size} bytes, the "
                                    f"manifest records {f['bytes']} (truncated or replaced)")
            if verify_hash and sha256_file(p) != f["sha256"]:
                raise ArtifactError(f"{target} artifact: {p} does not match the sha256 the "
                                    f"manifest records (corrupt or replaced)")

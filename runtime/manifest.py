"""Reading `manifest.json`, the only contract between the compiler and the runtime. Its schema and
version live in `runtime.contract` (`validate`); this module reads the file, checks it against
that schema and checks the artifact files it lists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .contract import MANIFEST_FILE as FILENAME, Contract, ManifestError, validate


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
        try:
            validate(data)
        except ManifestError as e:
            raise ArtifactError(f"{path}: {e}") from None
        return cls(root, data)

    @cached_property
    def contract(self) -> Contract:
        """Signature names, shapes and the KV layout, derived as the exporter derived them."""
        return Contract.from_manifest(self.data)

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
        return self.contract.max_context

    @property
    def prefill_lengths(self) -> list[int]:
        return list(self.contract.prefill_lengths)

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

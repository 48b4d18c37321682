"""Reading `manifest.json`, the only contract between the compiler and the runtime. Its schema and
version live in `runtime.contract` (`validate`); this module reads the file, checks it against
that schema and checks the artifact files it lists: their sizes always, their sha256 (the
tokenizer's too) through `runtime.integrity` unless verification is turned off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import integrity
from .contract import MANIFEST_FILE as FILENAME, Contract, ManifestError, validate
from .integrity import sha256_file  # noqa: F401  (the exporter records hashes with it)


class ArtifactError(ValueError):
    pass


class IntegrityFailure(ArtifactError):
    """A file differs from its manifest's sha256: never a reason to fall back quietly."""


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

    def check_files(self, target: str, verify_hash: bool = False, use_cache: bool = True,
                    log=None, roles=None) -> None:
        """Every file of the artifact exists with its recorded size; with `verify_hash`, the
        files of `roles` (None: all; a backend names the ones it reads, so that loading a tflite
        artifact does not hash the `.litertlm` bundle it never opens) have their recorded sha256
        (`runtime.integrity`; `use_cache`: trust the user's record of files verified before and
        unchanged since)."""
        files = {role: self.present(f, f"{target} artifact")
                 for role, f in self.artifact(target)["files"].items()}
        if verify_hash:
            self.verify([f for role, f in files.items() if roles is None or role in roles],
                        use_cache, log, what=f"{target} artifact")

    def present(self, record: dict, what: str) -> tuple[Path, str]:
        """(path, sha256) of a file record ({"path", "sha256", "bytes"}), after checking that the
        file exists with its recorded size."""
        p = self.path(record["path"])
        if not p.is_file():
            raise ArtifactError(f"{what}: missing file {p}")
        if p.stat().st_size != record["bytes"]:
            raise ArtifactError(f"{what}: {p} has {p.stat().st_size} bytes, the manifest "
                                f"records {record['bytes']} (truncated or replaced)")
        return p, record["sha256"]

    def check_tokenizer(self, verify_hash: bool = True, use_cache: bool = True, log=None) -> Path:
        """The tokenizer file, present and (with `verify_hash`) with its recorded sha256."""
        p = self.path(self.tokenizer["file"])
        if not p.is_file():
            raise ArtifactError(f"{self.root}: missing tokenizer file {p}")
        if verify_hash:
            self.verify([(p, self.tokenizer["sha256"])], use_cache, log, what="tokenizer")
        return p

    def verify(self, files, use_cache: bool, log, what: str) -> None:
        try:
            integrity.verify(files, use_cache=use_cache, log=log)
        except integrity.IntegrityError as e:
            raise IntegrityFailure(f"{what}: {e}") from None

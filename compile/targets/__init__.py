"""Export targets. Each target is one module exposing the same small interface:

    NAME: str                       the manifest key and the artifact's subdirectory
    PARITY: dict                    tolerances the exporter checks ({"max_rel_diff", "min_top1"})
    def write(traced, params, out_dir, options, progress) -> dict
        lowers the traced signatures, writes files under out_dir, and returns the target-specific
        part of the manifest's artifact record ("files" maps roles to paths relative to out_dir).

Targets read `signatures` for names, shapes and layouts and never import each other.
"""

from __future__ import annotations

import importlib

AVAILABLE = ("xla",)


def get(name: str):
    if name not in AVAILABLE:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(AVAILABLE)}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")

"""The backend interface every target's runtime implements.

A backend owns the loaded artifact (graphs and weights, loaded once) and nothing per request: the KV
state is a value it creates, takes and returns, so one backend serves many generations at once.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    target: str

    def new_state(self) -> Any:
        """A fresh, zeroed KV cache in whatever form the backend keeps it."""

    def prefill(self, signature: str, tokens: np.ndarray, start: int, state: Any) -> Any:
        """Run `signature` (a prefill_N) on tokens [N] int32 at positions start..start+N-1."""

    def decode(self, token: int, pos: int, state: Any) -> tuple[np.ndarray, Any]:
        """One token at `pos`: returns (logits [V] float32, new state)."""


def physical_cores() -> int:
    """Physical cores (the interpreter's default is a single thread)."""
    try:
        seen = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    seen.add((phys, core))
                    phys = core = None
        if core is not None:
            seen.add((phys, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


def writable_dir(preferred, name: str):
    """`preferred`, created if needed, or `$XDG_CACHE_HOME/gemma-aot/<name>` when that is not
    writable (a read-only artifact directory); None when neither is."""
    from pathlib import Path
    for d in (Path(preferred), Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
              / "gemma-aot" / name):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return None

"""The backend interface every target's runtime implements.

A backend owns the loaded artifact (graphs and weights, loaded once) and nothing per request: the KV
state is a value it creates, takes and returns, so one backend serves many generations at once.
"""

from __future__ import annotations

import contextlib
import os
import re
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

    def verify(self, signature: str, tokens: np.ndarray, start: int, state: Any
               ) -> tuple[np.ndarray, Any]:
        """Optional. Run `signature` (a verify_N) on tokens [N] at positions start..start+N-1:
        returns (logits [N, V] float32 of every position, new state). A backend whose
        `verify_any_length` is true takes any N (the name is then ignored)."""


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


# What LiteRT and TensorFlow's C++ logging write straight to file descriptor 2 while loading a
# model or converting one: its accelerator registry, vendor plugins that are not installed (an
# OpenVINO plugin on every machine), the XNNPACK delegate, absl's INFO lines. Around 40 lines per
# load, none of which a user can act on; ERROR and FATAL lines are kept.
_NATIVE_NOISE = re.compile(
    r"(INFO|WARNING): \[[\w.]+:\d+\] "            # LiteRT's logger: INFO: [environment.cc:36] …
    r"|└ "                                         # …the continuation of a plugin's load failure
    r"|INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")      # absl: I0000 00:00:… 4965 port.cc:153] …


@contextlib.contextmanager
def quiet_native_logs():
    """Runs the block with file descriptor 2 (where native libraries log) sent to a temporary
    file, then writes back to stderr every line that is not `_NATIVE_NOISE`: errors and all that
    Python printed meanwhile still reach the user, in order, after the block. Keep blocks short
    (a model load, a conversion pass), since nothing written in them shows until they end."""
    import sys
    import tempfile
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no fd 2 (or interpreter shutdown)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()

"""The backend interface every target's runtime implements.

A backend owns the loaded artifact (graphs and weights, loaded once) and nothing per request: the KV
state is a value it creates, takes and returns, so one backend serves many generations at once.
"""

from __future__ import annotations

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

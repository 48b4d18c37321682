"""The runtime's KV cache: buffers per generation, the past views a `rows` graph reads, and the
in-place writes of the rows it returns. Backends allocate and pass caches through this module; the
layout (names, shapes per layer, windows) comes from `runtime.contract`.

A generation's cache is a plain dict `name -> buffer`, created by the backend and passed into and
returned from every call. Full-form backends (tflite, xla, xla-tpu) keep it in their engine's
buffers in the contract's full layout and let the graph update it in place; the `rows` form (onnx)
keeps host buffers [1, K, S, H] for both K and V, hands the graph the slots `past_slots` picks and
writes the new rows itself.
"""

from __future__ import annotations

import numpy as np

from .contract import FULL, ROWS, KVLayout


def past_slots(start: int, most: int | None) -> tuple[int, int]:
    """The cache slots [lo, hi) passed as a layer's past for a call at `start`: the `most` slots
    before it (the layer's `past_window`; None: all), and at least one, since the graph takes
    the slots it is given to lie just before start and masks those that would precede position 0."""
    n = max(1, start if most is None else min(start, most))
    lo = max(0, start - n)
    return lo, lo + n


def zeros(layout: KVLayout, form: str = FULL, slots: int | None = None,
          alloc=np.zeros) -> dict:
    """A fresh cache: one zeroed buffer per cache tensor, allocated by `alloc(shape, dtype)`
    (numpy by default; a backend passes its own, e.g. jnp.zeros or a device placement)."""
    return {t.name: alloc(t.shape, t.dtype) for t in layout.specs(form, slots)}


class RowsCache:
    """Host buffers for a `rows` graph: `past(state, start)` gives each cache input (a view when
    contiguous, i.e. with one KV head; else numpy copies the slice), `write(state, start, rows)`
    stores the graph's new rows at their positions."""

    def __init__(self, layout: KVLayout, slots: int | None = None):
        self.layout = layout
        self.slots = layout.max_context if slots is None else int(slots)
        # windows computed once per call, not per layer
        self._windows = {c.past_window for c in layout.caches}

    def new(self) -> dict:
        return zeros(self.layout, ROWS, self.slots)

    def past(self, state: dict, start: int) -> dict:
        slots = {w: past_slots(start, w) for w in self._windows}
        out = {}
        for c in self.layout.caches:
            lo, hi = slots[c.past_window]
            for name in c.names:
                out[name] = np.ascontiguousarray(state[name][:, :, lo:hi])
        return out

    def write(self, state: dict, start: int, rows: dict) -> None:
        """rows: cache name -> [1, K, T, H] new rows for positions start..start+T-1."""
        for name, r in rows.items():
            state[name][:, :, start:start + r.shape[2]] = r

"""Runs the ONNX artifact with ONNX Runtime: CUDA when onnxruntime-gpu and a GPU are present,
else CPU (`provider` says which).

One session serves every generation: ORT's `run` is thread-safe and each generation's KV cache is
its own set of host buffers, so many threads can generate at once. The graph's cache outputs are
`rows` (`runtime.contract`; the manifest entry's `cache_outputs`): `runtime.kv.RowsCache` hands
each layer's cache input as a view of the state's numpy buffer (the filled part, or its last
window - 1 slots for a sliding-window layer; bound without a copy when contiguous, i.e. one KV
head, else numpy copies the view), and writes the new rows the graph returns into the buffers. So
a decode step reads the filled part of each cache and copies none. An artifact with LoRA slots has one graph
for both signature sets: the slot inputs are bound from ORT values prepared once per adapter (or
zeros for the base model), never copied per call. With the CUDA provider ORT
copies those views to the device on each call (the Python API cannot write a slice of a device
buffer).
"""

from __future__ import annotations

import numpy as np

from .. import contract as ct
from ..kv import RowsCache
from .base import physical_cores

TARGET = "onnx"


def pick_provider(available: list[str]) -> str:
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available \
        else "CPUExecutionProvider"



def unsupported(record: dict, machine) -> str | None:
    """ONNX Runtime's CPU provider runs on any machine it installs on (CUDA when it offers it);
    artifacts from before cache outputs became `rows` need a re-export."""
    if record.get("cache_outputs") != ct.ROWS:
        return ("it returns whole caches per call (exported by an older gemma-aot); re-export it "
                "with `python -m compile.export --target onnx`")
    return None


class OnnxBackend:
    target = TARGET
    dynamic_length = True   # one graph runs any prefill length: no padding needed

    def __init__(self, manifest, record: dict, num_threads: int | None = None,
                 provider: str | None = None):
        import onnxruntime as ort
        self._ort = ort
        path = manifest.path(record["files"]["model"]["path"])
        reason = unsupported(record, None)
        if reason:
            raise RuntimeError(f"cannot run {path}: {reason}")
        self.provider = provider or pick_provider(ort.get_available_providers())
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads or physical_cores()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=[self.provider])
        except Exception as e:   # onnxruntime raises its own exception classes
            raise RuntimeError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.num_threads = so.intra_op_num_threads
        self.max_length = int(record.get("max_length", manifest.max_context))
        self._cache = RowsCache(manifest.contract.kv, self.max_length)
        # the graph returns the logits of the positions fed as logit_index; one exported
        # before that input (schema version 2) returns the last position's, and the runtime
        # scores a text through it one decode at a time
        self.verify_any_length = ct.LOGIT_INDEX in {i.name for i in self.session.get_inputs()}
        self._rows = {name: ct.rows_name(name) for name in self._cache.layout.names}
        # io.get_outputs() follows the order of the bind_output calls in _run
        self._output_order = list(self._rows.values()) + [ct.LOGITS]
        # with LoRA slots the graph always takes them: zeros (the base model) unless an adapter
        contract = manifest.contract
        self._zeros = self.lora_inputs({t.name: np.zeros(t.shape, np.float32)
                                        for t in contract.lora_specs()})

    def lora_inputs(self, arrays: dict):
        """The slot inputs as ORT values, once per (adapter, scale); read-only afterwards."""
        return {k: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32))
                for k, a in arrays.items()}

    def new_state(self):
        """Full-length numpy buffers [1, K, S, H] per cache, written in place."""
        return self._cache.new()

    def _run(self, tokens, start, state, want_logits, lora=None, every=False):
        n = tokens.shape[0]
        if start + n > self.max_length:
            raise ValueError(f"positions {start}..{start + n - 1} exceed the cache length "
                             f"{self.max_length}")
        io = self.session.io_binding()
        io.bind_cpu_input(ct.TOKENS, tokens.reshape(1, n).astype(np.int32))
        io.bind_cpu_input(ct.INPUT_POS, np.arange(start, start + n, dtype=np.int32))
        for name, past in self._cache.past(state, start).items():
            io.bind_cpu_input(name, past)
            io.bind_output(self._rows[name], "cpu")
        for name, value in (self._zeros if lora is None else lora).items():
            io.bind_ortvalue_input(name, value)
        if self.verify_any_length:   # every position's logits, or the last one's
            io.bind_cpu_input(ct.LOGIT_INDEX, np.arange(n, dtype=np.int32) if every
                              else np.array([n - 1], np.int32))
        io.bind_output(ct.LOGITS, "cpu")
        self.session.run_with_iobinding(io)
        outputs = dict(zip(self._output_order, io.get_outputs()))
        self._cache.write(state, start, {name: outputs[out].numpy()        # [1, K, T, H]
                                         for name, out in self._rows.items()})
        logits = outputs[ct.LOGITS].numpy()[0] if want_logits else None     # [R, V]
        return (logits if every or logits is None else logits[-1]), state

    def prefill(self, signature, tokens, start, state, lora=None):
        return self.prefill_tokens(tokens, start, state, lora)

    def prefill_tokens(self, tokens, start, state, lora=None):
        """Any number of tokens in one call (the graph's token dimension is dynamic)."""
        return self._run(np.asarray(tokens, np.int32), start, state, False, lora)[1]

    def decode(self, token, pos, state, lora=None):
        return self._run(np.array([token], np.int32), pos, state, True, lora)

    def verify(self, signature, tokens, start, state, lora=None):
        """(logits [n, V] of each of the n tokens, state): any n (`verify_any_length`)."""
        return self._run(np.asarray(tokens, np.int32), start, state, True, lora, every=True)

"""Runs the ONNX artifact with ONNX Runtime: CUDA when onnxruntime-gpu and a GPU are present,
else CPU (`provider` says which).

One session serves every generation: ORT's `run` is thread-safe and each generation's KV cache is
its own set of OrtValues, so many threads can generate at once. The cache never round-trips through
numpy: each step binds the previous step's output OrtValues as inputs (IOBinding) and lets ORT
allocate the new ones on the same device; only the logits come back to the host.
"""

from __future__ import annotations

import numpy as np

from .base import physical_cores

TARGET = "onnx"


def pick_provider(available: list[str]) -> str:
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available \
        else "CPUExecutionProvider"



def unsupported(record: dict, machine) -> str | None:
    """ONNX Runtime's CPU provider runs on any machine it installs on (CUDA when it offers it)."""
    return None

class OnnxBackend:
    target = TARGET
    dynamic_length = True   # one graph runs any prefill length: no padding needed

    def __init__(self, manifest, record: dict, num_threads: int | None = None,
                 provider: str | None = None):
        import onnxruntime as ort
        self._ort = ort
        path = manifest.path(record["files"]["model"]["path"])
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
        decode = manifest.signature("decode")
        self._kv = [(t["name"], tuple(t["shape"]), record["output_names"][t["name"]])
                    for t in decode["inputs"] if t["name"].startswith("kv_cache_")]
        # io.get_outputs() follows the order of the bind_output calls in _run
        self._output_order = [out for _, _, out in self._kv] + ["logits"]

    def new_state(self):
        ov = self._ort.OrtValue
        return {name: ov.ortvalue_from_numpy(np.zeros(shape, np.float32), self.device, 0)
                for name, shape, _ in self._kv}

    def _run(self, tokens, start, state, want_logits):
        n = tokens.shape[0]
        io = self.session.io_binding()
        io.bind_cpu_input("tokens", tokens.reshape(1, n).astype(np.int32))
        io.bind_cpu_input("input_pos", np.arange(start, start + n, dtype=np.int32))
        for name, _, out_name in self._kv:
            io.bind_ortvalue_input(name, state[name])
            io.bind_output(out_name, self.device)
        io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(io)
        outputs = dict(zip(self._output_order, io.get_outputs()))
        new_state = {name: outputs[out_name] for name, _, out_name in self._kv}
        logits = outputs["logits"].numpy()[0, -1] if want_logits else None
        return logits, new_state

    def prefill(self, signature, tokens, start, state):
        return self.prefill_tokens(tokens, start, state)

    def prefill_tokens(self, tokens, start, state):
        """Any number of tokens in one call (the graph's token dimension is dynamic)."""
        return self._run(np.asarray(tokens, np.int32), start, state, False)[1]

    def decode(self, token, pos, state):
        return self._run(np.array([token], np.int32), pos, state, True)

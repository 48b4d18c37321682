"""Runs the TFLite artifact with ai-edge-litert's interpreter (XNNPACK, physical-core threads).

The KV cache lives in numpy arrays owned by the caller's state. Each signature runner call copies
its inputs into the interpreter and its outputs back out, the whole cache twice per token; the
measured cost is reported by `benchmark_copy()`.
"""

from __future__ import annotations

import os
import threading

import numpy as np

TARGET = "tflite"


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


class TfliteBackend:
    target = TARGET

    def __init__(self, manifest, record: dict, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter
        path = manifest.path(record["files"]["model"]["path"])
        self.num_threads = num_threads or physical_cores()
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=self.num_threads)
        except (ValueError, RuntimeError) as e:
            raise RuntimeError(f"LiteRT cannot load {path}: {e}") from e
        names = set(self.interpreter.get_signature_list())
        missing = [s["name"] for s in manifest.signatures if s["name"] not in names]
        if missing:
            raise RuntimeError(f"{path} lacks signatures {missing} that the manifest lists")
        self._runners = {s["name"]: self.interpreter.get_signature_runner(s["name"])
                         for s in manifest.signatures}
        decode = manifest.signature("decode")
        self._kv = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in decode["inputs"]
                    if t["name"].startswith("kv_cache_")]
        self._lock = threading.Lock()   # one interpreter: invocations must not overlap

    def new_state(self):
        return {name: np.zeros(shape, dtype) for name, shape, dtype in self._kv}

    def _run(self, name, tokens, start, state):
        n = tokens.shape[0]
        with self._lock:
            out = self._runners[name](tokens=tokens.reshape(1, n).astype(np.int32),
                                      input_pos=np.arange(start, start + n, dtype=np.int32),
                                      **state)
        return out, {k: out[k] for k, _, _ in self._kv}

    def prefill(self, signature, tokens, start, state):
        return self._run(signature, np.asarray(tokens, np.int32), start, state)[1]

    def decode(self, token, pos, state):
        out, state = self._run("decode", np.array([token], np.int32), pos, state)
        return out["logits"][0, 0], state

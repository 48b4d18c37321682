"""Runs the TFLite artifact with LiteRT's CompiledModel API (XNNPACK on CPU, physical-core threads).

Memory: XNNPACK repacks every matmul weight into its own layout. Without a weight cache that
copy is anonymous memory beside the mapped model file (Gemma 3 270M fp32: 2.1 GB anonymous +
1.05 GB of file pages for a 1.07 GB model; int8: 0.58 GB + 0.29 GB). So the backend gives
XNNPACK a weight cache file, by default `tflite/xnnpack_cache/<model sha256>-<cpu>.xnnpack_cache`
beside the artifact (or `$XDG_CACHE_HOME/gemma-aot/xnnpack` when that is not writable, or
`cache_dir`; False turns it off; `<cpu>` keys the CPU's architecture and feature flags): the first
load packs into that file (fp32 270M, load + 58 tokens: 1.9 GB peak instead of 3.4 GB), later
loads map it (1.3 GB, 0.1 s to open instead of 2 s), and the packed weights are file pages the
kernel can reclaim.

The KV cache of a generation is a set of LiteRT TensorBuffers, bound as both the input and the
output of the same name on every call, so the graph updates it in place, as LiteRT-LM's engine does
on CPU: nothing copies the cache between steps or between prefill and decode. With an adapter the
calls go to the `lora_*` signatures, which share the weights, with the slot inputs as TensorBuffers
written once per adapter. Every model of the process shares one LiteRT environment (`_environment`), set up once and kept
to the end; LiteRT's own log lines (its accelerator registry, vendor plugins that are not
installed) are kept off the user's terminal (`base.quiet_native_logs`). (The classic
Interpreter's signature runner copies every input in and every output out, the whole cache twice
per token: on the int8 Gemma 3 270M, 2 threads, that ran decode at 24 tok/s against 38 tok/s here.)
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .. import contract as ct
from .base import physical_cores, quiet_native_logs, writable_dir

TARGET = "tflite"



def unsupported(record: dict, machine) -> str | None:
    """LiteRT's CPU kernels (XNNPACK) run on any machine its wheel installs on."""
    return None

def weight_cache_path(preferred, sha256: str) -> str | None:
    """Where XNNPACK keeps this model's packed weights: a file named by the model's sha256 and
    this CPU in `preferred` (or `$XDG_CACHE_HOME/gemma-aot/xnnpack`); None when neither is
    writable."""
    d = writable_dir(preferred, "xnnpack")
    return None if d is None else str(d / f"{sha256[:32]}-{_machine_key()}.xnnpack_cache")


def _machine_key() -> str:
    """The packed layout depends on the kernels XNNPACK picks for this CPU: a cache is only
    reused on a machine with the same architecture and CPU feature flags."""
    import hashlib
    import platform
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


_shared = {}


def _environment():
    """One LiteRT environment for every model this process loads (CompiledModel's default is a
    new one per model): its accelerator registry is set up, and logged, once — quietly — and it
    is destroyed only when the process ends (`_quiet_at_exit`), since a buffer made by a model
    keeps the model's environment alive past the model and would log its teardown wherever it
    happened to be freed."""
    if "env" not in _shared:
        import ai_edge_litert.compiled_model as cm
        with quiet_native_logs():
            _shared["env"] = cm.Environment.create(options=cm.EnvironmentOptions(
                runtime_path=os.path.dirname(os.path.abspath(cm.__file__))))
        _quiet_at_exit()
    return _shared["env"]


def _quiet_at_exit() -> None:
    """Registered once, with the shared environment, which LiteRT destroys after Python has
    finished (a C++ static), logging a line per accelerator below the program's last output. An
    exit hook, run after the program and before that, points file descriptor 2 at /dev/null; what Python prints from then
    on (warnings from later exit hooks) is lost with it."""
    import atexit
    import sys

    def hide():
        try:
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except (OSError, ValueError):
            pass
    atexit.register(hide)


class TfliteBackend:
    target = TARGET
    reads = ("model",)   # the artifact's `.litertlm` is LiteRT-LM's and the Android app's

    def __init__(self, manifest, record: dict, num_threads: int | None = None,
                 cache_dir: str | bool | None = None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import Options
        path = manifest.path(record["files"]["model"]["path"])
        # LiteRT crashes (not raises) on some malformed flatbuffers: check the file first
        with open(path, "rb") as f:
            if f.read(8)[4:8] != b"TFL3":
                raise RuntimeError(f"LiteRT cannot load {path}: not a TFLite flatbuffer")
        self.num_threads = num_threads or physical_cores()
        options = Options()
        options.cpu_options.num_threads = self.num_threads
        self.weight_cache = None if cache_dir is False else weight_cache_path(
            cache_dir or path.parent / "xnnpack_cache", record["files"]["model"]["sha256"])
        if self.weight_cache:
            options.cpu_options.xnnpack_weight_cache_path = self.weight_cache
        try:
            env = _environment()
            with quiet_native_logs():   # the OpenVINO plugin LiteRT tries on every load
                self.model = CompiledModel.from_file(str(path), options=options,
                                                     environment=env)
            names = set(self.model.get_signature_list())
        except Exception as e:   # the bindings raise RuntimeError/ValueError subclasses variously
            raise RuntimeError(f"LiteRT cannot load {path}: {e}") from e
        missing = [s.name for s in manifest.contract.signatures() if s.name not in names]
        if missing:
            raise RuntimeError(f"{path} lacks signatures {missing} that the manifest lists")
        contract = manifest.contract
        self._kv = contract.kv
        self.vocab_size = contract.vocab_size
        # per-signature token/position buffers and the logits buffer are shared by all
        # generations; the lock keeps one call (write inputs, run, read logits) atomic
        self._io = {s.name: (self.model.create_input_buffer_by_name(s.name, ct.TOKENS),
                             self.model.create_input_buffer_by_name(s.name, ct.INPUT_POS))
                    for s in contract.signatures()}
        self._logits = self.model.create_output_buffer_by_name(ct.DECODE, ct.LOGITS)
        self._verify = {s.name: self.model.create_output_buffer_by_name(s.name, ct.LOGITS)
                        for s in contract.signatures() if s.kind == ct.VERIFY and not s.lora}
        with quiet_native_logs():   # the first write creates LiteRT's process-wide environment
            self._io[ct.DECODE][0].write(np.zeros((1, 1), np.int32))
        # (a LoRA signature's logits have its base's shape: one buffer serves both)
        self._lock = threading.Lock()

    def new_state(self):
        """The generation's cache as LiteRT TensorBuffers, zeroed."""
        state = {}
        for spec in self._kv.specs():
            buf = self.model.create_input_buffer_by_name(ct.DECODE, spec.name)
            buf.write(np.zeros(spec.shape, spec.dtype))
            state[spec.name] = buf
        return state

    def lora_inputs(self, arrays: dict):
        """The slot inputs as TensorBuffers, written once per (adapter, scale) and only read by
        the `lora_*` signatures afterwards."""
        out = {}
        for name, a in arrays.items():
            buf = self.model.create_input_buffer_by_name(ct.lora_name(ct.DECODE), name)
            buf.write(np.ascontiguousarray(a, np.float32))
            out[name] = buf
        return out

    def _run(self, name, tokens, start, state, outputs, lora=None):
        n = tokens.shape[0]
        if lora is not None:
            name = ct.lora_name(name)
        tok_buf, pos_buf = self._io[name]
        tok_buf.write(tokens.reshape(1, n).astype(np.int32))
        pos_buf.write(np.arange(start, start + n, dtype=np.int32))
        self.model.run_by_name(name, {ct.TOKENS: tok_buf, ct.INPUT_POS: pos_buf, **state,
                                      **(lora or {})}, {**outputs, **state})

    def prefill(self, signature, tokens, start, state, lora=None):
        with self._lock:
            self._run(signature, np.asarray(tokens, np.int32), start, state, {}, lora)
        return state

    def decode(self, token, pos, state, lora=None):
        with self._lock:
            self._run(ct.DECODE, np.array([token], np.int32), pos, state,
                      {ct.LOGITS: self._logits}, lora)
            logits = self._logits.read(self.vocab_size, np.float32)
        return logits, state

    def verify(self, signature, tokens, start, state, lora=None):
        """(logits [N, V] of each token, state) through `signature` (verify_N, N tokens)."""
        tokens = np.asarray(tokens, np.int32)
        out = self._verify[signature]
        with self._lock:
            self._run(signature, tokens, start, state, {ct.LOGITS: out}, lora)
            logits = out.read(len(tokens) * self.vocab_size, np.float32)
        return logits.reshape(len(tokens), self.vocab_size), state

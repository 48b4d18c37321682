"""gemma-aot's compiler: `python -m compile.export`. It needs the `export` extra (JAX, the
checkpoint readers and every target's converter); the runtime alone does not."""

import importlib.util as _util
import sys as _sys

_missing = [m for m in ("jax", "gguf", "onnx", "tqdm") if _util.find_spec(m) is None]
if _missing:
    _msg = (f"the compiler needs the export extra ({', '.join(_missing)} not installed): "
            f"pip install 'gemma-aot[export]'")
    if _sys.argv[:1] == ["-m"]:   # `python -m compile.…` is starting: one line, no traceback
        raise SystemExit(f"error: {_msg}")
    raise ImportError(_msg)

from runtime.devices import quiet_jax as _quiet_jax   # before any of the compiler starts JAX

_quiet_jax()

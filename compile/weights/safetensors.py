"""safetensors files, read and written one tensor at a time.

Reading parses the header, checking every tensor's dtype, shape and byte range against the file
(a bad file is named with the tensor at fault), and reads a tensor's bytes only when it is loaded
(bf16 included, via ml_dtypes). Writing lays out the header from shapes alone, then appends each tensor as it arrives, in the
order and format of the `safetensors` library (tensors sorted by name within a dtype, header padded
with spaces to 8 bytes), so a streamed file equals the library's byte for byte.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
          "I8": np.int8, "U8": np.uint8, "I32": np.int32, "I64": np.int64}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
# the safetensors library's dtype order (it writes larger enum values first)
_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
          "F32", "F64", "I64", "U64"]


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, read only when `load()` is called."""
    path: Path
    offset: int                  # absolute byte offset of its data in the file
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self) -> np.ndarray:
        """The tensor, read into memory with plain file reads (not a memory map, whose touched
        pages would stay in the process's RSS for as long as the map lives)."""
        count = int(np.prod(self.shape, dtype=np.int64))
        a = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset)
        if a.size != count:
            raise SafetensorsError(f"{self.path}: truncated while reading a tensor at byte "
                                   f"{self.offset}")
        return a.reshape(self.shape)


def read(path: Path) -> dict[str, Entry]:
    """name -> Entry, from the header alone (every entry checked against the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise SafetensorsError(f"{path}: truncated safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = [int(d) for d in shape]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"{path}: corrupt safetensors header entry for tensor "
                                   f"{name}: {json.dumps(info)[:100]}") from None
        if code not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {code}")
        dt = np.dtype(DTYPES[code])
        if 8 + n + end > size:
            raise SafetensorsError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end} "
                                   f"but the file has {size} bytes")
        if not 0 <= begin <= end or end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise SafetensorsError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] hold "
                                   f"{end - begin} bytes, its {code} shape {shape} needs "
                                   f"{int(np.prod(shape, dtype=np.int64)) * dt.itemsize}")
        out[name] = Entry(path, 8 + n + begin, tuple(shape), dt)
    return out


def write(path: Path, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
          get: Callable[[str], np.ndarray], metadata: dict | None = None, tick=None) -> None:
    """Writes `path` from shapes and dtypes (`specs`), fetching each tensor with `get(name)` only
    when its turn comes; the file is written under a temporary name and renamed when complete."""
    path = Path(path)
    order = sorted(specs, key=lambda k: (-_ORDER.index(_code(specs[k][1])), k))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                shape, dtype = specs[name]
                a = np.require(get(name), requirements="C")
                if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
                    raise ValueError(f"{name}: got {a.dtype}{list(a.shape)}, expected "
                                     f"{np.dtype(dtype)}{list(shape)}")
                f.write(a.view(np.uint8).reshape(-1).data)   # little-endian on every host we run
                if tick:
                    tick()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _code(dtype) -> str:
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"safetensors: unsupported dtype {np.dtype(dtype)}") from None

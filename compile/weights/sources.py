"""Lazy tensors: a weight is read, dequantized and put into the model's layout only when asked for.

A `Tensor` knows its name, shape and dtype without reading anything; `read()` produces the array
(a float32 array in `model.param_shapes` layout, unless the source says otherwise). `Params` maps the
model's parameter names to them: `params[name]` reads one tensor and keeps nothing, so iterating
over a checkpoint's weights holds one tensor (plus what its reader maps) at a time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:
    from .quant import Blocks


@dataclass(frozen=True)
class Tensor:
    name: str                      # the model's parameter name
    shape: tuple[int, ...]         # what read() returns
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    origin: str = ""               # file and tensor it comes from, for error messages
    format: str = "F32"            # how the checkpoint stores it (a GGUF type, "F32", "BF16", ...)
    blocks: Callable[[], "Blocks"] | None = None   # its stored blocks, unchanged (`quant.Blocks`
    #                                [out, in] rows), where the checkpoint is block-quantized
    part: Callable[[int], np.ndarray] | None = None   # index e of the leading axis, read alone
    #                                (expert stacks [E, in, out]: one expert without the rest)
    rows: Callable[[int, int], np.ndarray] | None = None   # rows lo..hi of a table, read alone
    #                                (Gemma 4's per-layer embedding table: 9.4 GB in float32)

    def get_rows(self, lo: int, hi: int) -> np.ndarray:
        """self.get()[lo:hi], reading only those rows where the source can."""
        if self.rows is None:
            return np.ascontiguousarray(self.get()[lo:hi])
        a = self.rows(lo, hi)
        if tuple(a.shape) != (hi - lo,) + tuple(self.shape[1:]):
            raise ValueError(f"{self.origin or self.name}: read rows {lo}:{hi} as "
                             f"{list(a.shape)}")
        check_finite(a, f"{self.origin or self.name} [rows {lo}:{hi}]")
        return a

    def get_part(self, e: int) -> np.ndarray:
        """self.get()[e], reading only that part where the source can."""
        if self.part is None:
            return np.ascontiguousarray(self.get()[e])
        a = self.part(e)
        if tuple(a.shape) != tuple(self.shape[1:]):
            raise ValueError(f"{self.origin or self.name}: read part {e} as {list(a.shape)}, "
                             f"expected {list(self.shape[1:])}")
        check_finite(a, f"{self.origin or self.name} [expert {e}]")
        return a

    def get(self) -> np.ndarray:
        a = self.read()
        if tuple(a.shape) != tuple(self.shape) or a.dtype != self.dtype:
            raise ValueError(f"{self.origin or self.name}: read {a.dtype}{list(a.shape)}, expected "
                             f"{np.dtype(self.dtype)}{list(self.shape)}")
        check_finite(a, self.origin or self.name)
        return a


class NonFiniteWeights(ValueError):
    """A checkpoint tensor holds NaN or Inf: no artifact is built from it."""


def check_finite(a: np.ndarray, what: str, chunk: int = 1 << 22) -> None:
    """Raises NonFiniteWeights naming `what` when float array `a` holds NaN or Inf; checks in
    chunks so that the check holds no copy of a large tensor."""
    if a.dtype.kind not in "fc":
        return
    flat = a.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        if not np.isfinite(part).all():
            nan = sum(int(np.isnan(flat[j:j + chunk]).sum()) for j in range(0, flat.size, chunk))
            inf = sum(int(np.isinf(flat[j:j + chunk]).sum()) for j in range(0, flat.size, chunk))
            raise NonFiniteWeights(
                f"{what}: {nan} NaN and {inf} infinite values of {flat.size}; a checkpoint with "
                f"non-finite weights cannot make a working artifact")


class Params(Mapping):
    """Parameter name -> array, each read on access and not kept. `merged` maps the weights a
    LoRA adapter changed (`compile.lora.merge`: float now) to the format the checkpoint stored."""

    merged: Mapping[str, str] = MappingProxyType({})

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = dict(tensors)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "Params":
        """In-memory arrays (tiny test models) behind the same interface."""
        return cls({k: Tensor(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in
                    arrays.items()})

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name].get()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name) -> bool:   # Mapping's default would read the tensor
        return name in self.tensors

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype), reading nothing."""
        return {k: (t.shape, np.dtype(t.dtype)) for k, t in self.tensors.items()}

    def format(self, name: str) -> str:
        return self.tensors[name].format

    def native(self, name: str):
        """The checkpoint's own blocks of `name` (`quant.Blocks`, rows as [out, in]), or None
        when it is stored in float."""
        t = self.tensors[name]
        if not t.blocks:
            return None
        b = t.blocks()
        check_finite(b.scale, f"{t.origin or name} (block scales)")
        if b.bias is not None:
            check_finite(b.bias, f"{t.origin or name} (block offsets)")
        return b

    def take_rows(self, name: str, ids) -> np.ndarray:
        """Rows `ids` of table `name`, reading only the row ranges they fall in."""
        return take_rows(self, name, ids)

    def subset(self, names) -> dict[str, np.ndarray]:
        """The arrays of `names`, read now (e.g. one layer's weights)."""
        return {n: self[n] for n in names}


ROW_CHUNK = 8192   # rows per read of a large table (and per random draw of one)
ROW_TABLES = ("embed", "ple_embed")   # tables that random weights draw in row chunks


def take_rows(params: Mapping, name: str, ids) -> np.ndarray:
    """params[name][ids] (ids: int array of any shape), reading whole ROW_CHUNK-row ranges of a
    lazy table, never the table."""
    ids = np.asarray(ids)
    if not isinstance(params, Params):
        return np.asarray(params[name])[ids]
    t = params.tensors[name]
    if t.rows is None:   # a source that reads only whole: once
        return t.get()[ids]
    out = np.empty(ids.shape + tuple(t.shape[1:]), np.dtype(t.dtype))
    flat, dst = ids.reshape(-1), out.reshape((-1,) + tuple(t.shape[1:]))
    for c in np.unique(flat // ROW_CHUNK):
        lo = int(c) * ROW_CHUNK
        block = t.get_rows(lo, min(lo + ROW_CHUNK, t.shape[0]))
        hit = flat // ROW_CHUNK == c
        dst[hit] = block[flat[hit] - lo]
    return out


def row_chunks(params: Mapping, name: str):
    """(lo, rows) over table `name`, ROW_CHUNK rows at a time."""
    shape = specs_of(params)[name][0]
    for lo in range(0, shape[0], ROW_CHUNK):
        hi = min(lo + ROW_CHUNK, shape[0])
        if isinstance(params, Params):
            yield lo, params.tensors[name].get_rows(lo, hi)
        else:
            yield lo, np.asarray(params[name][lo:hi])


EXPERT_LEAVES = {"experts_gate": "gate_proj", "experts_up": "up_proj",
                 "experts_down": "down_proj"}


def expert_name(stack: str, e: int) -> str:
    """`layers.3.experts_gate`, 5 -> `layers.3.expert5.gate_proj`: one expert's matmul, named so
    that it is quantized and stored as the dense FFN's matmul of the same kind."""
    prefix, leaf = stack.rsplit(".", 1)
    return f"{prefix}.expert{e}.{EXPERT_LEAVES[leaf]}"


def split_experts(params: Mapping) -> Mapping:
    """The same weights with every expert stack [E, in, out] replaced by E matmul weights
    [in, out] (`expert_name`), each read alone (`Tensor.get_part`): for targets that store one
    matmul per expert (onnx)."""
    if not any(n.rsplit(".", 1)[-1] in EXPERT_LEAVES for n in params):
        return params
    if not isinstance(params, Params):
        out = {}
        for n, a in params.items():
            if n.rsplit(".", 1)[-1] in EXPERT_LEAVES:
                out.update({expert_name(n, e): np.ascontiguousarray(a[e])
                            for e in range(a.shape[0])})
            else:
                out[n] = a
        return out
    tensors = {}
    for n, t in params.tensors.items():
        if n.rsplit(".", 1)[-1] not in EXPERT_LEAVES:
            tensors[n] = t
            continue
        for e in range(t.shape[0]):
            name = expert_name(n, e)
            tensors[name] = Tensor(name, tuple(t.shape[1:]), t.dtype,
                                   (lambda t=t, e=e: t.get_part(e)),
                                   f"{t.origin or n} [expert {e}]", t.format)
    out = Params(tensors)
    out.merged = params.merged
    return out


def specs_of(params: Mapping) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of a Params (reading nothing) or of a dict of arrays."""
    if isinstance(params, Params):
        return params.specs()
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in params.items()}


FLOAT_FORMATS = ("F32", "F16", "BF16")   # stored formats that are plain floats, not blocks


def format_of(params: Mapping, name: str) -> str:
    """How the checkpoint stores `name` (a GGUF type, "F32", ...); a dict of arrays is float."""
    return params.format(name) if isinstance(params, Params) else "F32"


def float32_record(params: Mapping, name: str) -> str:
    """The manifest's record of a tensor an artifact stores in float32."""
    fmt = format_of(params, name)
    return "float32" + (f" (from {fmt})" if fmt != "F32" else "")


def nbytes_of(params: Mapping) -> int:
    return int(sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
                   for shape, dt in specs_of(params).values()))


def seeded(shapes: Mapping[str, tuple[int, ...]], seed: int, std: Callable[[str, tuple], float],
           dtype=np.float32, mean: Callable[[str], float] | None = None) -> Params:
    """Random weights produced on the fly, each tensor from its own generator seeded by (seed,
    name): the same values whatever order they are read in, with no storage. `mean(name)` shifts
    a tensor (Gemma 4's multiplicative norm scales sit around 1)."""
    def make(name, shape):
        def draw(key, part_shape):
            rng = np.random.default_rng(key)
            a = rng.standard_normal(part_shape, dtype=np.float32)
            a *= np.float32(std(name, shape))          # in place: a 12B embedding is 4 GB
            if mean is not None and mean(name):
                a += np.float32(mean(name))
            return a.astype(dtype, copy=False)
        key = [seed, zlib.crc32(name.encode())]
        if name in ROW_TABLES:   # one draw per chunk of rows: a range reads alone
            chunk = lambda c: draw(key + [c], (min(ROW_CHUNK, shape[0] - c * ROW_CHUNK),)
                                   + tuple(shape[1:]))

            def rows(lo, hi):
                parts = [chunk(c) for c in range(lo // ROW_CHUNK, (hi - 1) // ROW_CHUNK + 1)]
                a = np.concatenate(parts) if len(parts) > 1 else parts[0]
                off = lo - (lo // ROW_CHUNK) * ROW_CHUNK
                return np.ascontiguousarray(a[off:off + hi - lo])
            return Tensor(name, tuple(shape), np.dtype(dtype), lambda: rows(0, shape[0]),
                          origin=f"random:{name}", rows=rows)
        if name.rsplit(".", 1)[-1] in EXPERT_LEAVES:   # one draw per expert: a part reads alone
            part = lambda e: draw(key + [e], tuple(shape[1:]))
            return Tensor(name, tuple(shape), np.dtype(dtype),
                          lambda: np.stack([part(e) for e in range(shape[0])]),
                          origin=f"random:{name}", part=part)
        return Tensor(name, tuple(shape), np.dtype(dtype), lambda: draw(key, tuple(shape)),
                      origin=f"random:{name}")
    return Params({n: make(n, s) for n, s in shapes.items()})

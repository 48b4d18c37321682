"""ONNX container writer: weights become external-data initializers, written one tensor at a time.

The graph arrives with every weight as a graph input (jax2onnx traced the model with the weights
as arguments, so the graph holds none of them). `finish` turns each weight input into an
initializer whose bytes live in the data file beside the model, appending tensors as the lazy
checkpoint produces them (those of 64 KiB or more at a 4 KiB-aligned offset, so ONNX Runtime can
map them), and replaces every quantized matmul by ORT's `MatMulNBits` (com.microsoft):

  B       uint8 [N, K / block, block * bits / 8]: the weight's rows ([out, in] = [N, K]) in blocks
          of `block` inputs, each value stored unsigned as q + 2^(bits-1) (4 bits: two per byte,
          the even element in the low nibble)
  scales  float32 [N * K / block]
  (no zero points: ORT's default, 2^(bits-1), makes the blocks symmetric)

So the writer holds one float tensor (and its quantized form) at a time, never the model. The
output projection (the tied embedding, reached through a Transpose in the traced graph) becomes a
MatMulNBits on the table's own rows, and the Transpose goes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quant import pack_int4

PAGE = 4096
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Blocks:
    """A matmul weight quantized for MatMulNBits: q int8 [N, K] (signed, in [-2^(b-1), 2^(b-1))),
    scales float32 [N, K / block]."""
    bits: int
    block: int
    q: np.ndarray
    scale: np.ndarray

    def packed(self) -> np.ndarray:
        N, K = self.q.shape
        u = (self.q.astype(np.int16) + (1 << (self.bits - 1))).astype(np.uint8)
        if self.bits == 4:
            u = pack_int4(u.view(np.int8))                           # same nibble order
        return u.reshape(N, K // self.block, self.block * self.bits // 8)


class DataFile:
    """The external data file, appended tensor by tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = open(self.tmp, "wb")

    def add(self, name: str, array: np.ndarray):
        import onnx
        a = np.ascontiguousarray(array)
        pad = -self.f.tell() % (PAGE if a.nbytes >= 16 * PAGE else 64)
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(a.reshape(-1).view(np.uint8).data)
        t = onnx.TensorProto()
        t.name = name
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)),
                           ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, value
        return t

    def close(self, keep: bool) -> None:
        self.f.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def finish(graph, tensors, data_path: Path, tick=None) -> dict:
    """Moves the weights into `graph` (an onnx ModelProto whose weights are graph inputs):
    `tensors` yields (name, array) for plain initializers and (name, Blocks) for quantized matmul
    weights, one at a time. Writes the data file; returns counts for the manifest."""
    import onnx
    g = graph.graph
    inputs = {i.name: i for i in g.input}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    data = DataFile(data_path)
    ok = False
    replaced = 0
    drop = set()
    try:
        for name, value in tensors:
            if name not in inputs:
                raise ValueError(f"onnx: the traced graph has no weight input {name!r}")
            g.input.remove(inputs.pop(name))
            if isinstance(value, Blocks):
                replaced += _to_matmul_nbits(g, name, value, consumers, data, drop)
            else:
                g.initializer.append(data.add(name, value))
            if tick:
                tick()
        ok = True
    finally:
        data.close(keep=ok)
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in graph.opset_import) and replaced:
        graph.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return {"quantized_matmuls": replaced}


def _to_matmul_nbits(g, name: str, w: Blocks, consumers, data: DataFile, drop: set) -> int:
    """Replaces the MatMuls that read `name` ([K, N], or a Transpose of the [N, K] table)."""
    import onnx
    N, K = w.q.shape
    targets = []
    for n in consumers.get(name, []):
        if n.op_type == "MatMul" and n.input[1] == name:
            targets.append(n)
        elif n.op_type == "Transpose" and all(c.op_type == "MatMul" and c.input[1] == n.output[0]
                                             for c in consumers.get(n.output[0], [])):
            targets += consumers.get(n.output[0], [])
            drop.add(id(n))
        elif n.op_type == "Gather":
            raise ValueError(f"onnx: {name} is also a lookup table; quantize a copy for the lookup")
        else:
            raise ValueError(f"onnx: {name} is read by a {n.op_type} node ({n.name}); only "
                             f"MatMuls can read a quantized weight")
    if not targets:
        raise ValueError(f"onnx: no MatMul reads {name}; cannot quantize it")
    g.initializer.append(data.add(name + ".B", w.packed()))
    g.initializer.append(data.add(name + ".scales", w.scale.astype(np.float32).reshape(-1)))
    for n in targets:
        new = onnx.helper.make_node(
            "MatMulNBits", [n.input[0], name + ".B", name + ".scales"], list(n.output),
            name=n.name, domain=MS_DOMAIN, K=K, N=N, bits=w.bits, block_size=w.block,
            accuracy_level=4)
        n.CopyFrom(new)
    return len(targets)

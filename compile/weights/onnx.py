"""ONNX container writer: weights become external-data initializers, written one tensor at a time.

The graph arrives with every weight as a graph input (jax2onnx traced the model with the weights
as arguments, so the graph holds none of them). `finish` turns each weight input into an
initializer whose bytes live in the data file beside the model, appending tensors as the lazy
checkpoint produces them (those of 64 KiB or more at a 4 KiB-aligned offset, so ONNX Runtime can
map them), and replaces every quantized matmul by ORT's `MatMulNBits` (com.microsoft):

  B       uint8 [N, K / block, block * bits / 8]: the weight's rows ([out, in] = [N, K]) in blocks
          of `block` inputs, each value stored unsigned as q + 2^(bits-1) (4 bits: two per byte,
          the even element in the low nibble); 5- and 6-bit blocks (GGUF's Q5_0, Q6_K) are
          stored in 8 bits, exactly
  scales  float32 [N * K / block]
  (no zero points: ORT's default, 2^(bits-1), makes the blocks symmetric)

Asymmetric blocks (`Blocks.bias`: GGUF's Q4_K, Q4_1, ...) add their bias term beside the
MatMulNBits: the input's per-block sums (a MatMul by a 0/1 indicator) times the transposed
biases, a matmul 1/block the size of the weight's. ORT's float zero points would express them
directly but run its unpacked path (measured: 50x slower than the packed kernels).

With float activations (`--activations float`: accuracy level 1 instead of 4, which quantizes
activations to int8 per block) ORT's 8-bit kernel is its unpacked one (measured: 634 ms against
7.5 ms for the 262144 x 640 head), so 8-bit blocks are written as two exact 4-bit halves (`halves`)
whose MatMulNBits results are added.

So the writer holds one float tensor (and its quantized form) at a time, never the model. The
output projection (the tied embedding, reached through a Transpose in the traced graph) becomes a
MatMulNBits on the table's own rows, and the Transpose goes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .quant import Blocks, pack_int4

PAGE = 4096
MS_DOMAIN = "com.microsoft"


def container_bits(b: Blocks) -> int:
    """MatMulNBits stores 4 or 8 bits: 5- and 6-bit values (Q5_0, Q6_K, ...) widen to 8, exactly."""
    return 4 if b.bits <= 4 else 8


def packed(b: Blocks) -> np.ndarray:
    """uint8 [N, K / block, block * bits / 8]: each value stored unsigned as q + 2^(bits-1) of
    the container's bits (ORT's default zero point), 4 bits two per byte (even element low)."""
    N, K = b.q.shape
    bits = container_bits(b)
    u = (b.q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        u = pack_int4(u.view(np.int8))                           # same nibble order
    return u.reshape(N, K // b.block, b.block * bits // 8)


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


def finish(graph, tensors, data_path: Path, float_activations: bool = False) -> dict:
    """Moves the weights into `graph` (an onnx ModelProto whose weights are graph inputs):
    `tensors` yields (name, array) for plain initializers and (name, Blocks) for quantized matmul
    weights, one at a time. Writes the data file; returns counts for the manifest."""
    import onnx
    g = graph.graph
    inputs = {i.name: i for i in g.input}
    _uncapture(g, set(inputs))
    consumers: dict[str, list] = {}
    for sub in _graphs(g):    # If branches (per-expert FFNs) read weights from the outer scope
        for n in sub.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
    data = DataFile(data_path)
    ok = False
    replaced = 0
    drop = set()
    after: dict[int, list] = {}   # id(node) -> nodes that must follow it
    try:
        for name, value in tensors:
            if name not in inputs:
                raise ValueError(f"onnx: the traced graph has no weight input {name!r}")
            g.input.remove(inputs.pop(name))
            if isinstance(value, Blocks):
                replaced += _to_matmul_nbits(g, name, value, consumers, data, drop, after,
                                             float_activations)
            else:
                g.initializer.append(data.add(name, value))
        ok = True
    finally:
        data.close(keep=ok)
    for sub in _graphs(g):
        kept = []
        for n in sub.node:
            if id(n) not in drop:
                kept += [n] + after.get(id(n), [])
        del sub.node[:]
        sub.node.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in graph.opset_import) and replaced:
        graph.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return {"quantized_matmuls": replaced}


def subgraphs(node):
    """The graphs held in a node's attributes (If branches, Loop bodies)."""
    from onnx import AttributeProto
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _graphs(g):
    """g and every graph nested in its nodes' attributes (If branches), depth first."""
    yield g
    for n in g.node:
        for sub in subgraphs(n):
            yield from _graphs(sub)


def _uncapture(g, names: set) -> None:
    """jax2onnx hands an outer value to an If branch through an Identity ("capture") inside the
    branch; for the weights (`names`), the branch's nodes read the outer name instead, so each
    weight is read under its own name wherever it is used (names inside a branch are local to
    it, so the rewrite stays within the branch and its own branches)."""
    def branch(sub, renames):
        local = dict(renames)
        keep = []
        for n in sub.node:
            if n.op_type == "Identity" and n.input[0] in names:
                local[n.output[0]] = n.input[0]
                continue
            for k, i in enumerate(n.input):
                if i in local:
                    n.input[k] = local[i]
            for x in subgraphs(n):
                branch(x, local)
            keep.append(n)
        if len(keep) < len(sub.node):
            del sub.node[:]
            sub.node.extend(keep)

    for n in g.node:
        for x in subgraphs(n):
            branch(x, {})


def halves(w: Blocks) -> tuple[Blocks, Blocks]:
    """Blocks of 5 to 8 bits as two 4-bit ones whose sum is exactly w: q = 16 hi + lo with
    hi = q >> 4 in [-8, 7] (scale 16 s) and lo = q & 15 in [0, 15], stored as lo - 8 (ORT's
    default zero point) with scale s and a bias of 8 s per block (plus w's own bias). 16 s and
    8 s are exact in float32."""
    hi = w.q >> 4                                   # arithmetic shift: floor(q / 16)
    lo = (w.q & 15).astype(np.int8) - np.int8(8)
    s = w.scale.astype(np.float32)
    bias = 8 * s if w.bias is None else w.bias + 8 * s
    return (Blocks(4, w.block, hi, 16 * s, None, w.source),
            Blocks(4, w.block, lo, s, bias, w.source))


def parts(w: Blocks, float_activations: bool) -> list[tuple[str, Blocks]]:
    """The MatMulNBits terms that compute x @ w: (initializer name suffix, blocks). With int8
    activations (accuracy level 4) one term of 4 or 8 bits; with float activations (level 1,
    where ORT's 8-bit kernel is unpacked and ~80x slower than its 4-bit one) 8-bit blocks are
    two 4-bit halves (`halves`)."""
    if float_activations and container_bits(w) == 8:
        hi, lo = halves(w)
        return [(".hi", hi), (".lo", lo)]
    return [("", w)]


def _to_matmul_nbits(g, name: str, w: Blocks, consumers, data: DataFile, drop: set,
                     after: dict, float_activations: bool = False) -> int:
    """Replaces the MatMuls that read `name` ([K, N], or a Transpose of the [N, K] table) by the
    sum of `parts(w)`: MatMulNBits each, accuracy level 4 (activations quantized to int8 per
    block) or 1 (float32 activations). Terms with a bias (asymmetric blocks: w = scale * q +
    bias) add one bias term for all of them, x's per-block sums times the summed biases:
    MatMul(MatMul(x, S), bias^T) with S [K, K / block] the 0/1 block indicator, a matmul 1/block
    the size of the weight's (ORT's float zero points, the direct form, run its unpacked path:
    50x slower)."""
    targets = _matmuls_reading(name, consumers, drop)
    terms = parts(w, float_activations)
    bias = _add_initializers(g, name, w, terms, data)
    for n in targets:
        nodes = _nbits_nodes(n, name, w, terms, bias is not None, float_activations)
        n.CopyFrom(nodes[0])
        after[id(n)] = nodes[1:]
    return len(targets)


def _matmuls_reading(name: str, consumers, drop: set) -> list:
    """The MatMuls that read `name`, directly or through a Transpose (which goes in `drop`);
    any other reader is an error."""
    targets = []
    for n in list(consumers.get(name, [])):
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
    return targets


def _add_initializers(g, name: str, w: Blocks, terms, data: DataFile):
    """Each term's packed blocks and scales, and the bias term's tables; returns the summed
    bias [N, K / block] (None when no term has one)."""
    K = w.q.shape[1]
    bias = None
    for suffix, b in terms:
        g.initializer.append(data.add(name + suffix + ".B", packed(b)))
        g.initializer.append(data.add(name + suffix + ".scales",
                                      b.scale.astype(np.float32).reshape(-1)))
        if b.bias is not None:
            bias = b.bias if bias is None else bias + b.bias
    if bias is not None:
        nb = K // w.block
        indicator = np.zeros((K, nb), np.float32)
        indicator[np.arange(K), np.arange(K) // w.block] = 1.0
        g.initializer.append(data.add(name + ".block_sum", indicator))
        g.initializer.append(data.add(name + ".bias_t", np.ascontiguousarray(bias.T, np.float32)))
    return bias


def _nbits_nodes(n, name: str, w: Blocks, terms, has_bias: bool, float_activations: bool):
    """The nodes that replace the MatMul `n`: its output is the sum of the terms (and the bias
    term)."""
    import onnx
    make = onnx.helper.make_node
    N, K = w.q.shape
    x, (y,) = n.input[0], list(n.output)
    single = len(terms) == 1 and not has_bias
    nodes, addends = [], []
    for suffix, b in terms:
        out = y if single else f"{y}/q{suffix}"
        nodes.append(make("MatMulNBits", [x, name + suffix + ".B", name + suffix + ".scales"],
                          [out], name=f"{n.name}{suffix}", domain=MS_DOMAIN, K=K, N=N,
                          bits=container_bits(b), block_size=w.block,
                          accuracy_level=1 if float_activations else 4))
        addends.append(out)
    if has_bias:
        nodes += [make("MatMul", [x, name + ".block_sum"], [f"{y}/block_sums"],
                       name=f"{n.name}/block_sums"),
                  make("MatMul", [f"{y}/block_sums", name + ".bias_t"], [f"{y}/bias"],
                       name=f"{n.name}/bias")]
        addends.append(f"{y}/bias")
    total = addends[0]
    for k, term in enumerate(addends[1:], 1):   # y = the addends' sum
        out = y if k == len(addends) - 1 else f"{y}/sum{k}"
        nodes.append(make("Add", [total, term], [out], name=f"{n.name}/add{k}"))
        total = out
    return nodes

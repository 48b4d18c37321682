"""Simplifies the ONNX graph jax2onnx writes, before its weights are attached.

jax2onnx spells every reshape and broadcast whose shape involves a symbolic dimension (T new
tokens, P/L past slots) as a subgraph that computes the shape at run time (Shape -> Gather ->
Squeeze -> Unsqueeze -> Concat), and every broadcast as a materialized Expand. ONNX Runtime cannot
fold those (the dimensions are unknown when it loads), so a one-token decode step ran ~6,300
nodes, a third of them shape arithmetic, and the per-node cost outweighed the matmuls.

The passes use the shapes jax2onnx records for every value (`value_info`, symbolic dimensions by
name); each rewrite is exact for every value the symbols can take:

  reshapes   a computed target shape becomes a constant: static dimensions as numbers, a symbolic
             one that sits at the same index of the input as 0 ("copy that dimension"), and at
             most one other as -1 ("infer")
  expands    an Expand whose output has its input's shape is dropped; so is one whose consumers
             are all broadcasting element-wise ops that yield the same shape without it
  rms norms  Mul(x, x) -> ReduceMean -> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .) -> Mul(., scale)
             becomes one SimplifiedLayerNormalization (ONNX Runtime's kernel; same arithmetic)
  shared     equal small constants become one, then nodes with the same op, attributes and
             inputs become one (common subexpressions): each layer recomputed the RoPE tables
             and the attention masks from the positions; now each kind is computed once
  dead code  nodes whose outputs nothing reads are removed (the shape subgraphs, once unused)

The export's parity check compares the result with the JAX reference, as for every artifact.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from ..weights.onnx import subgraphs

# element-wise ops whose inputs broadcast (numpy rules) to their output's shape
BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "And", "Or", "Xor", "Where",
                "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"}


def _shapes(graph) -> dict[str, list | None]:
    """value name -> dims (int, or the symbol's name; None where unknown)."""
    out = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[v.name] = [d.dim_value if d.HasField("dim_value")
                       else (d.dim_param or None) for d in t.shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return names


def _known(dims) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _reshape_target(src, dst) -> list[int] | None:
    """A constant Reshape target giving `dst` from `src` for every value of the symbols, or None."""
    if not (_known(dst) and src is not None):
        return None
    target, infer = [], 0
    for i, d in enumerate(dst):
        if isinstance(d, int):
            target.append(d)
        elif i < len(src) and src[i] == d:
            target.append(0)
        else:
            target.append(-1)
            infer += 1
    return target if infer <= 1 else None


def _broadcast(shapes) -> list | None:
    if not all(_known(s) for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return out


def simplify(model) -> dict[str, int]:
    """Rewrites `model` (an onnx ModelProto, weights as graph inputs or initializers) in place;
    returns how many of each rewrite it made."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = _shapes(graph)
    consts = _constants(graph)
    outputs = {o.name for o in graph.output}
    done = Counter()

    # reshapes: computed target shapes become constants
    new_inits = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in consts:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = _reshape_target(shapes.get(node.input[0]), shapes.get(node.output[0]))
        if target is None:
            continue
        name = f"{node.output[0]}__shape"
        new_inits.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        done["reshape"] += 1
    graph.initializer.extend(new_inits)

    # expands: dropped where the result's shape is unchanged without them
    consumers = defaultdict(list)
    for node in graph.node:
        for i in _reads(node):
            consumers[i].append(node)
    renames = {}
    for node in graph.node:
        if node.op_type != "Expand" or node.output[0] in outputs:
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(src) and _known(dst)):
            continue
        ok = src == dst
        if not ok:
            users = consumers[node.output[0]]
            ok = bool(users) and all(
                u.op_type in BROADCASTING and u.domain in ("", "ai.onnx")
                and _broadcast([shapes.get(node.input[0]) if i == node.output[0]
                                else shapes.get(i) for i in u.input]) == shapes.get(u.output[0])
                for u in users)
        if ok:
            renames[node.output[0]] = node.input[0]
            done["expand"] += 1
    _rename(graph, renames)

    done["dead"] = _remove_dead(graph)     # first, so that bypassed nodes count as no reader
    done["rms_norm"] = _fuse_rms_norms(graph, shapes, consts, helper)
    done["shared"] = _share(graph)
    done["dead"] += _remove_dead(graph)
    return dict(done)


SHARED_CONST_BYTES = 4096   # constants up to this size are compared by value


def _share(graph) -> int:
    """Merges equal constants (initializers and Constant nodes up to SHARED_CONST_BYTES), then
    nodes with the same domain, op, attributes and inputs (in graph order, so inputs are merged
    before their readers are compared). Returns the number of nodes and constants merged."""
    from onnx import numpy_helper
    outputs = {o.name for o in graph.output}
    renames, seen = {}, {}
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        if a.nbytes <= SHARED_CONST_BYTES:
            key = ("init", a.dtype.str, a.shape, a.tobytes())
            if key in seen:
                renames[init.name] = seen[key]
            else:
                seen[key] = init.name
    merged = len(renames)
    keep = []
    for node in graph.node:
        _rewrite_inputs(node, renames)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            a = numpy_helper.to_array(node.attribute[0].t)
            key = ("init", a.dtype.str, a.shape, a.tobytes()) \
                if a.nbytes <= SHARED_CONST_BYTES else None
        elif "Random" in node.op_type or any(o in outputs for o in node.output):
            key = None
        else:
            key = (node.domain, node.op_type, tuple(node.input), len(node.output),
                   tuple(a.SerializeToString() for a in sorted(node.attribute,
                                                               key=lambda a: a.name)))
        if key is not None and key in seen and len(node.output) == 1:
            renames[node.output[0]] = seen[key]
            merged += 1
            continue
        if key is not None and len(node.output) == 1:
            seen[key] = node.output[0]
        keep.append(node)
    if merged:
        del graph.node[:]
        graph.node.extend(keep)
    return merged


def _reads(node) -> set[str]:
    """Every value a node reads: its inputs and what its subgraphs read from the outer scope
    (an If branch may use outer values without listing them as inputs)."""
    out = {i for i in node.input if i}
    for g in subgraphs(node):
        inner = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            inner.update(n.output)
        for n in g.node:
            out |= {r for r in _reads(n) if r not in inner}
    return out


def _rewrite_inputs(node, renames: dict[str, str]) -> None:
    """Applies renames to a node's inputs and, recursively, its subgraphs' inputs."""
    for k, i in enumerate(node.input):
        if i in renames:
            node.input[k] = renames[i]
    for g in subgraphs(node):
        for n in g.node:
            _rewrite_inputs(n, renames)
        for o in g.output:   # a branch may return an outer value as it is
            if o.name in renames:
                o.name = renames[o.name]


def _rename(graph, renames: dict[str, str]) -> None:
    def final(name):
        while name in renames:
            name = renames[name]
        return name
    flat = {k: final(k) for k in renames}
    for node in graph.node:
        _rewrite_inputs(node, flat)


def _scalar(graph, name, consts):
    """The value of a constant scalar input, or None."""
    from onnx import numpy_helper
    if name not in consts:
        return None
    for init in graph.initializer:
        if init.name == name:
            a = numpy_helper.to_array(init)
            return float(a.reshape(-1)[0]) if a.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            a = numpy_helper.to_array(node.attribute[0].t)
            return float(a.reshape(-1)[0]) if a.size == 1 else None
    return None


class _Uses:
    """Who produces and who reads each value of a graph."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for i in _reads(node):
                self.consumers[i].append(node)

    def only_user(self, value, op):
        """The one node reading `value`, when there is one and it is an `op`."""
        users = self.consumers[value]
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def reduces_last_axis(self, node, shapes) -> bool:
        """A ReduceMean over the last axis alone, keeping it."""
        ax = None
        for a in node.attribute:
            if a.name == "axes":
                ax = list(a.ints)
        if ax is None and len(node.input) > 1:
            from onnx import numpy_helper
            for init in self.graph.initializer:
                if init.name == node.input[1]:
                    ax = numpy_helper.to_array(init).reshape(-1).tolist()
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        rank = len(shapes.get(node.input[0]) or [])
        return keep == 1 and ax is not None and len(ax) == 1 and ax[0] in (-1, rank - 1)


def _fuse_rms_norms(graph, shapes, consts, helper) -> int:
    """Mul(x,x) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .) -> Mul(., s)
    => SimplifiedLayerNormalization(x, s) over the last axis (s of the last axis' length, read
    through any Reshape/Expand that only broadcast it)."""
    uses = _Uses(graph)
    fused, drop, new = 0, set(), {}
    for sq in graph.node:
        m = _rms_norm_at(sq, uses, shapes, consts)
        if m is None:
            continue
        chain, x, s, eps, scale_mul = m
        drop.update(id(n) for n in chain)
        new[id(scale_mul)] = helper.make_node(
            "SimplifiedLayerNormalization", [x, s], [scale_mul.output[0]],
            name=f"{scale_mul.output[0]}__rms", axis=-1, epsilon=eps, stash_type=1)
        fused += 1
    if fused:
        nodes = [new.get(id(n), n) for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(nodes)
    return fused


def _rms_norm_at(sq, uses: _Uses, shapes, consts):
    """(the nodes before the scale's Mul, x, scale, eps, the scale's Mul) of an RMSNorm that
    starts at the Mul(x, x) `sq`, or None."""
    graph = uses.graph
    if sq.op_type != "Mul" or sq.input[0] != sq.input[1]:
        return None
    x = sq.input[0]
    mean = uses.only_user(sq.output[0], "ReduceMean")
    add = mean and uses.only_user(mean.output[0], "Add")
    if not (mean and add and uses.reduces_last_axis(mean, shapes)):
        return None
    eps = _scalar(graph, add.input[1] if add.input[0] == mean.output[0] else add.input[0],
                  consts)
    sqrt = uses.only_user(add.output[0], "Sqrt")
    div = sqrt and uses.only_user(sqrt.output[0], "Div")
    if eps is None or not div or div.input[1] != sqrt.output[0] \
            or _scalar(graph, div.input[0], consts) != 1.0:
        return None
    norm = uses.only_user(div.output[0], "Mul")
    if not norm or set(norm.input) != {x, div.output[0]}:
        return None
    scale_mul = uses.only_user(norm.output[0], "Mul")
    if not scale_mul:
        return None
    s = scale_mul.input[1] if scale_mul.input[0] == norm.output[0] else scale_mul.input[0]
    while s in uses.producer and uses.producer[s].op_type in ("Reshape", "Expand") \
            and len(uses.consumers[s]) == 1:
        s = uses.producer[s].input[0]
    xs, ss, ys = shapes.get(x), shapes.get(s), shapes.get(scale_mul.output[0])
    if not (xs and ss and ys == xs and len(ss) == 1 and ss[0] == xs[-1]
            and isinstance(ss[0], int)):
        return None
    return (sq, mean, add, sqrt, div, norm), x, s, eps, scale_mul


def _remove_dead(graph) -> int:
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live.update(_reads(node))
    removed = len(graph.node) - len(keep)
    if removed:
        del graph.node[:]
        graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in live]
    if len(inits) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    for node in graph.node:       # If branches: their own unread constants (ORT warns of each)
        for sub in subgraphs(node):
            read = {o.name for o in sub.output}
            for n in sub.node:
                read |= _reads(n)
            kept = [i for i in sub.initializer if i.name in read]
            if len(kept) < len(sub.initializer):
                del sub.initializer[:]
                sub.initializer.extend(kept)
    return removed

"""compile.targets.onnx_graph on small hand-built graphs: each rewrite happens where it is exact,
is left out where it is not, and the rewritten graph computes what the original did (ONNX Runtime,
several values of the symbolic dimension)."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from compile.targets import onnx_graph  # noqa: E402

D = 8


def _model(nodes, inputs, outputs, inits=(), value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    return helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def _vi(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _const(name, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _shape_subgraph(src, out, dims_before, dims_after):
    """out = Concat(dims_before, Shape(src)[1:2], dims_after): what jax2onnx writes for a reshape
    to [*dims_before, T, *dims_after]."""
    return [
        helper.make_node("Shape", [src], [f"{out}_s"]),
        helper.make_node("Gather", [f"{out}_s", "one"], [f"{out}_t"], axis=0),
        helper.make_node("Concat", ["before", f"{out}_t", "after"], [out], axis=0),
    ], [_const("one", [1]), _const("before", dims_before), _const("after", dims_after)]


def test_computed_reshape_becomes_constant_and_dead_shape_code_goes():
    # x [1, T, 8] -> reshape to [1, T, 2, 4] through a computed shape
    nodes, inits = _shape_subgraph("x", "shape", [1], [2, 4])
    nodes.append(helper.make_node("Reshape", ["x", "shape"], ["y"]))
    m = _model(nodes, [_vi("x", [1, "T", D])], [_vi("y", [1, "T", 2, 4])], inits)
    x = {T: np.random.default_rng(T).standard_normal((1, T, D), np.float32) for T in (1, 3, 7)}
    before = {T: _run(m, {"x": x[T]})[0] for T in x}
    done = onnx_graph.simplify(m)
    assert done["reshape"] == 1 and done["dead"] == 3
    assert [n.op_type for n in m.graph.node] == ["Reshape"]
    shape = next(i for i in m.graph.initializer if i.name == m.graph.node[0].input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, 0, 2, 4]   # T copied, by index
    for T in x:
        np.testing.assert_array_equal(_run(m, {"x": x[T]})[0], before[T])


def test_reshape_with_two_unknown_dims_is_left_alone():
    # [T, P] -> [P, T]: neither symbolic dimension sits at its input index; no constant can say it
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    m = _model(nodes, [_vi("x", ["T", "P"])], [_vi("y", ["P", "T"])], [_const("idx", [1, 0])])
    done = onnx_graph.simplify(m)
    assert done.get("reshape", 0) == 0 and len(m.graph.node) == 3


def test_expands_dropped_only_where_the_result_is_unchanged():
    # a: identity expand (same shape); b: broadcast into an Add whose other input has the full
    # shape (droppable); c: broadcast into a MatMul (not element-wise: kept)
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Expand", ["x", "sx"], ["xa"]),
        helper.make_node("Expand", ["w", "sx"], ["wb"]),
        helper.make_node("Add", ["xa", "wb"], ["y"]),
        helper.make_node("Expand", ["w", "sx"], ["wc"]),
        helper.make_node("Transpose", ["wc"], ["wct"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "wct"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [1, "T", D]), _vi("w", [D])],
               [_vi("y", [1, "T", D]), _vi("z", [1, "T", "T"])], (),
               [_vi("xa", [1, "T", D]), _vi("wb", [1, "T", D]), _vi("wc", [1, "T", D])])
    feeds = {T: {"x": np.random.default_rng(T).standard_normal((1, T, D), np.float32),
                 "w": np.arange(D, dtype=np.float32)} for T in (1, 4)}
    before = {T: _run(m, f) for T, f in feeds.items()}
    done = onnx_graph.simplify(m)
    assert done["expand"] == 2
    assert [n.op_type for n in m.graph.node].count("Expand") == 1
    for T, f in feeds.items():
        for a, b in zip(_run(m, f), before[T]):
            np.testing.assert_array_equal(a, b)


def _rms_nodes(div_numerator="one_f"):
    """y = x * 1/sqrt(mean(x*x) + eps) * reshape(1 + w): the model's RMS norm as jax2onnx
    writes it."""
    return [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rt"]),
        helper.make_node("Div", [div_numerator, "rt"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Add", ["one_f", "w"], ["scale"]),
        helper.make_node("Reshape", ["scale", "scale_shape"], ["scale3"]),
        helper.make_node("Mul", ["normed", "scale3"], ["y"]),
    ]


def _rms_model(div_numerator="one_f"):
    inits = [_const("axes", [2]), _const("eps", 1e-6, np.float32), _const("one_f", 1.0, np.float32),
             _const("two_f", 2.0, np.float32), _const("scale_shape", [1, 1, D])]
    vis = [_vi(n, s) for n, s in [("sq", [1, "T", D]), ("ms", [1, "T", 1]), ("mse", [1, "T", 1]),
                                  ("rt", [1, "T", 1]), ("inv", [1, "T", 1]),
                                  ("normed", [1, "T", D]), ("scale", [D]), ("scale3", [1, 1, D])]]
    return _model(_rms_nodes(div_numerator), [_vi("x", [1, "T", D]), _vi("w", [D])],
                  [_vi("y", [1, "T", D])], inits, vis)


def test_rms_norm_fused_into_one_node():
    m = _rms_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, D), np.float32) * 3
    w = rng.standard_normal(D).astype(np.float32)
    done = onnx_graph.simplify(m)
    assert done["rms_norm"] == 1
    assert sorted(n.op_type for n in m.graph.node) == ["Add", "SimplifiedLayerNormalization"]
    norm = next(n for n in m.graph.node if n.op_type == "SimplifiedLayerNormalization")
    assert helper.get_attribute_value(norm.attribute[1]) == pytest.approx(1e-6)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(_run(m, {"x": x, "w": w})[0], want, rtol=1e-5, atol=1e-5)


def test_not_an_rms_norm_is_left_alone():
    # 2 / sqrt(...) is not the reciprocal the kernel computes
    m = _rms_model(div_numerator="two_f")
    x = np.ones((1, 2, D), np.float32)
    w = np.zeros(D, np.float32)
    before = _run(m, {"x": x, "w": w})[0]
    assert onnx_graph.simplify(m)["rms_norm"] == 0
    np.testing.assert_array_equal(_run(m, {"x": x, "w": w})[0], before)


def test_equal_constants_and_repeated_subexpressions_are_computed_once():
    # what each layer did: sin/cos of the positions times its own copy of the same frequencies
    nodes, inits = [], []
    for layer in range(3):
        inits.append(_const(f"freq{layer}", np.arange(1, D + 1) / D, np.float32))
        nodes += [helper.make_node("Mul", ["pos", f"freq{layer}"], [f"ang{layer}"]),
                  helper.make_node("Sin", [f"ang{layer}"], [f"sin{layer}"]),
                  helper.make_node("Mul", ["x", f"sin{layer}"], [f"x{layer + 1}" if layer < 2
                                                                 else "y"])]
        nodes[-1].input[0] = "x" if layer == 0 else f"x{layer}"
    inits.append(_const("freq_other", np.arange(D) / D, np.float32))   # a different value: kept
    nodes += [helper.make_node("Mul", ["pos", "freq_other"], ["ang_o"]),
              helper.make_node("Sin", ["ang_o"], ["z"])]
    m = _model(nodes, [_vi("x", ["T", D]), _vi("pos", ["T", 1])], [_vi("y", ["T", D]),
                                                                    _vi("z", ["T", D])], inits)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, D), np.float32),
             "pos": np.arange(3, dtype=np.float32).reshape(3, 1)}
    before = _run(m, feeds)
    done = onnx_graph.simplify(m)
    assert done["shared"] == 2 + 2 * 2            # 2 constants, then Mul and Sin of 2 layers
    assert [n.op_type for n in m.graph.node].count("Sin") == 2
    assert sorted(i.name for i in m.graph.initializer) == ["freq0", "freq_other"]
    for a, b in zip(_run(m, feeds), before):
        np.testing.assert_array_equal(a, b)

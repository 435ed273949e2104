"""Shape vectors through TorchScript's expand idiom (issue 21): ``Where(Equal(s, -ones), ones,
s)`` passes ``s`` element by element where the equality is decided, keeping a stored element
rewritable only when a rewritten count cannot change the condition; ``dim * constant`` is
rewritable through the constant (``scale``)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnx_fpgm.deps.context import AnalysisContext
from onnx_fpgm.deps.shape_values import shape_elements


def _expand_graph(compared: list[int]) -> gs.Graph:
    """x (batch, 2, 1, 8) expanded to Where(Equal(s, compared), ones, s), s = [batch, 2, 4, 8];
    and a Reshape target [batch, Shape(x)[1] * 4, 8]."""
    def const(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Gather", ["shape", "one"], ["kv"], axis=0),
             helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
             helper.make_node("Concat", ["batch1", "rest"], ["s"], axis=0),
             helper.make_node("Shape", ["s"], ["s_len"]),
             helper.make_node("ConstantOfShape", ["s_len"], ["ones"],
                              value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Equal", ["s", "compared"], ["is_kept"]),
             helper.make_node("Where", ["is_kept", "ones", "s"], ["target"]),
             helper.make_node("Expand", ["x", "target"], ["y"], name="expand"),
             helper.make_node("Mul", ["kv", "n_rep"], ["merged"]),
             helper.make_node("Unsqueeze", ["merged", "axes0"], ["merged1"]),
             helper.make_node("Concat", ["batch1", "merged1", "eight"], ["t"], axis=0),
             helper.make_node("Reshape", ["y", "t"], ["z"], name="merge")]
    inits = [const("zero", 0), const("one", 1), const("axes0", [0]), const("rest", [2, 4, 8]),
             const("compared", compared), const("n_rep", 4), const("eight", [8])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return gs.import_onnx(onnx.shape_inference.infer_shapes(helper.make_model(graph)))


def _elements(graph: gs.Graph, node_name: str):
    ctx = AnalysisContext(graph, 17)
    node = next(n for n in graph.nodes if n.name == node_name)
    return shape_elements(node, 1, ctx)


def test_where_keeps_elements_rewritable_against_a_negative() -> None:
    batch, kv, n_rep, dim = _elements(_expand_graph([-1, -1, -1, -1]), "expand")
    assert batch.symbol == "b" and batch.source is None
    assert (kv.value, n_rep.value, dim.value) == (2, 4, 8)
    assert n_rep.source is not None and n_rep.source.position == 1  # 4 of the stored [2, 4, 8]


def test_where_decided_by_a_positive_comparison_is_not_rewritable() -> None:
    """Equal(s, 4) on the n_rep element: a rewritten n_rep could flip the condition."""
    _, _, n_rep, _ = _elements(_expand_graph([-1, -1, 4, -1]), "expand")
    assert n_rep.value == 1 and n_rep.source is None  # the ones branch, computed


def test_dim_times_constant_is_rewritten_through_the_constant() -> None:
    _, merged, _ = _elements(_expand_graph([-1, -1, -1, -1]), "merge")
    assert merged.value == 8 and merged.source is not None and merged.source.scale == 2

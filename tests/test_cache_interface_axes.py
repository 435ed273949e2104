"""KV caches under ``--allow-interface-change``, per axis (issue 21): whole KV groups and head
dims prune in both torch exports of a cached llama, the TorchScript one included (it reads the
KV head count and head_dim back by Shape to build repeat_kv's shapes: those sizes follow the
pruned cache at run time, ``deps/symbolic_sizes``); past_key_values.*/present.* shrink on the
heads axis and the head_dim axis, checked at past 0 and past 3 with the original's past
restricted to the kept heads and dims. Without the flag the interface stays as it was."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import onnx_fpgm
from onnx_fpgm.deps.context import AnalysisContext
from onnx_fpgm.deps.symbolic_sizes import reads_follow
from tests.conftest import check_pruned
from tests.llama_models import build_llama_like, export_llama_with_past

#: 8 query heads on 2 KV heads (n_rep 4), head_dim 4, as test_llama_cache's
CONFIG = {"vocab": 16, "dim": 32, "heads": 8, "kv_heads": 2, "hidden": 48, "layers": 2,
          "with_positions": True}
EXPORTS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


@functools.cache
def _export(dynamo: bool) -> bytes:
    return export_llama_with_past(build_llama_like(**CONFIG), dynamo).SerializeToString()


def _weights(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    stored = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted(stored[n.input[1]] for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in stored)


def _caches(values) -> dict[str, tuple]:
    return {v.name: tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim)
            for v in values if v.name.startswith(("past_key_values.", "present."))}


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", EXPORTS)
def test_kv_groups_and_head_dims_prune_with_the_flag(dynamo: bool) -> None:
    model = onnx.load_from_string(_export(dynamo))
    result = onnx_fpgm.prune(model, 0.5, allow_interface_change=True)
    check_pruned(model, result)  # the oracle on the kept heads and dims of the caches
    checked = result.report.verification["checked_at"]
    assert len(checked) == 2 and "past_key_values.0.key=1,2,0,4" in checked[0] and \
        "past_key_values.0.key=2,2,3,4" in checked[1]  # an empty past and a non-empty one
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(2, 1, None)] * 2
    changes = result.report.interface_changes
    assert len(changes) == 8
    for change in changes:  # (batch, 2 KV heads, past, head_dim 4) -> (., 1, ., 2)
        assert change["axes"] == [1, 3] and change["heads_axis"] == 1 and \
            change["head_dim_axis"] == 3
        assert (change["before"][1], change["before"][3]) == (2, 4)
        assert (change["after"][1], change["after"][3]) == (1, 2)
    for values in (result.model.graph.input, result.model.graph.output):
        assert {(d[1], d[3]) for d in _caches(values).values()} == {(1, 2)}
    # per layer: q keeps 4 heads x 2 dims (32 -> 8), k and v 1 head x 2 dims, o reads 8 rows;
    # the MLP keeps half; the LM head stays
    layer = [(32, 8), (32, 2), (32, 2), (8, 32), (32, 24), (32, 24), (24, 32)]
    assert _weights(result.model) == sorted([*layer, *layer, (32, 16)])


@pytest.mark.torch_export
def test_cli_names_each_axis_of_an_interface_change(tmp_path, capsys) -> None:
    from onnx_fpgm.cli import main as cli

    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    path.write_bytes(_export(False))
    assert cli.main([str(path), str(out), "--sparsity", "0.5", "--allow-interface-change"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("interface change:") == 8
    assert "interface change: input past_key_values.0.key: (batch, 2, past_sequence, 4) -> " \
        "(batch, 1, past_sequence, 2) (heads on axis 1, head_dim on axis 3)" in printed


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", EXPORTS)
def test_without_the_flag_the_interface_stays(dynamo: bool) -> None:
    """KV heads and head_dim stay (query slots and MLP prune, as test_llama_cache checks)."""
    model = onnx.load_from_string(_export(dynamo))
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert result.report.interface_changes == []
    assert _caches(result.model.graph.input) == _caches(model.graph.input)
    assert _caches(result.model.graph.output) == _caches(model.graph.output)
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after) for g in heads] == [(4, 2)] * 2


# ---- which sizes read by Shape follow the plan (symbolic_sizes.reads_follow) -----------------


def _reads(step: list[onnx.NodeProto], into: str = "Reshape") -> str | None:
    """Shape(x)[1] -> ``step`` (reading ``s``, writing ``t``) -> [1, t, 20] -> Reshape (or
    Expand) of x; the reason ``reads_follow`` gives for the Shape (None: it follows)."""
    const = [("one", [1]), ("two", [2]), ("four", [4]), ("neg", [-1]), ("idx", 1),
             ("zero", [0]), ("rest", [20])]
    nodes = [helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.INT64, [len(v)] if isinstance(v, list) else [], v
        if isinstance(v, list) else [v])) for name, v in const]
    nodes += [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
              helper.make_node("Gather", ["shape", "idx"], ["g"], axis=0),
              helper.make_node("Unsqueeze", ["g", "zero"], ["s"]), *step,
              helper.make_node("Concat", ["one", "t", "rest"], ["target"], axis=0),
              helper.make_node(into, ["x", "target"], ["y"], name="end")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph = gs.import_onnx(model)
    ctx = AnalysisContext(graph, 17)
    return reads_follow(next(n for n in graph.nodes if n.name == "shape"), ctx)


def test_sizes_that_follow_a_shrinking_level() -> None:
    """Moved, scaled by a constant (repeat_kv's ``kv * n_rep``), or through TorchScript's
    ``Where(Equal(s, -1), 1, s)``: the size read stays the size of the pruned tensor."""
    assert _reads([helper.make_node("Identity", ["s"], ["t"])]) is None
    assert _reads([helper.make_node("Mul", ["s", "four"], ["t"])]) is None
    where = [helper.make_node("Equal", ["s", "neg"], ["eq"]),
             helper.make_node("Where", ["eq", "one", "s"], ["t"])]
    assert _reads(where, into="Expand") is None


@pytest.mark.parametrize("step, why", [
    ([helper.make_node("Add", ["s", "one"], ["t"], name="add")], "Add add computes on"),
    ([helper.make_node("Div", ["s", "two"], ["t"], name="div")], "shaped by a size read by "
                                                                "Shape and divided"),
    ([helper.make_node("Equal", ["s", "one"], ["eq"], name="eq"),
      helper.make_node("Where", ["eq", "one", "s"], ["t"])], "Equal eq compares"),
    ([helper.make_node("Mul", ["s", "s"], ["t"], name="sq")], "not a positive constant"),
])
def test_sizes_computed_on_are_refused(step, why) -> None:
    """Arithmetic the plan would not follow (``s + 1``, ``s // 2`` into a shape, ``s == 1``
    that a rewritten count could flip, ``s * s``): refused, with the reason."""
    reason = _reads(step)
    assert reason is not None and why in reason, reason


def test_sizes_reaching_a_graph_output_are_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"], name="shape")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])])
    graph = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    reason = reads_follow(graph.nodes[0], AnalysisContext(graph, 17))
    assert reason is not None and "graph output" in reason


def test_restrict_takes_the_kept_grid() -> None:
    """An interface change restricts a cache on each axis that shrank (heads, then dims)."""
    from onnx_fpgm.deps.interface import InterfaceChange

    change = InterfaceChange("past", True, {1: np.array([1]), 3: np.array([0, 2])},
                             ("b", 2, "p", 4), heads_axis=1, head_dim_axis=3)
    value = np.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)
    assert change.after == ("b", 1, "p", 2)
    np.testing.assert_array_equal(change.restrict(value), value[:, [1]][..., [0, 2]])
    assert change.to_dict()["axes"] == [1, 3] and change.to_dict()["axis"] == 1


@pytest.mark.parametrize("picked, joins", [(2, True), (1, False)])
def test_a_cache_whose_past_length_is_read_still_joins(picked: int, joins: bool) -> None:
    """optimum reads the past length as ``Shape(past_key_values.0.key)[2]``: the cache still
    joins (its heads may shrink); a Shape read of its head axis keeps it out."""
    from onnx_fpgm.deps.interface import cache_inputs, joins_cache

    def value(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    nodes = [helper.make_node("Constant", [], ["i"], value=helper.make_tensor(
                 "i", TensorProto.INT64, [], [picked])),
             helper.make_node("Shape", ["past"], ["shape"]),
             helper.make_node("Gather", ["shape", "i"], ["length"], axis=0),
             helper.make_node("Concat", ["past", "new"], ["present"], axis=2, name="join")]
    graph = helper.make_graph(nodes, "g", [value("past", [1, 2, "p", 4]),
                                           value("new", [1, 2, 3, 4])],
                              [value("present", [1, 2, None, 4]),
                               helper.make_tensor_value_info("length", TensorProto.INT64, [])])
    graph = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ctx = AnalysisContext(graph, 17, cache_inputs=cache_inputs(graph))
    join = next(n for n in graph.nodes if n.name == "join")
    assert joins_cache(join, join.inputs[0], (1, 3), ctx) is joins

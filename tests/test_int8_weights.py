"""Weights stored as integers and dequantized by hand keep their dtype (issue 20).

A hand-quantized MiniLM stores its FFN weights as ``Mul(Cast(W_int8), scale)`` (per output
channel), with or without a zero point (``Mul(Sub(Cast(W), zp), scale)``). A sliced weight
keeps that chain: the int8 tensor and its per-channel scale are sliced, the float weight is
never written, and the pruned file is smaller than its input.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.oracle.validate import verify

HIDDEN, FFN = 16, 64


def _dequantized(name: str, rows: int, cols: int, form: str, rng) -> tuple[list, list, str]:
    """Nodes and initializers of ``name`` = dequantized int8 [rows, cols], per-column scale."""
    q = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
    scale_shape = {"per_column": (cols,), "row_vector": (1, cols), "zero_point": (cols,),
                   "per_tensor": ()}[form]
    scale = (rng.random(scale_shape) * 0.02 + 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale,
                                                                               f"{name}_s")]
    nodes = [helper.make_node("Cast", [f"{name}_q"], [f"{name}_f"], to=TensorProto.FLOAT,
                              name=f"{name}_cast")]
    source = f"{name}_f"
    if form == "zero_point":
        zp = rng.integers(-3, 4, (cols,)).astype(np.float32)
        inits.append(numpy_helper.from_array(zp, f"{name}_zp"))
        nodes.append(helper.make_node("Sub", [source, f"{name}_zp"], [f"{name}_c"],
                                      name=f"{name}_sub"))
        source = f"{name}_c"
    nodes.append(helper.make_node("Mul", [source, f"{name}_s"], [name], name=f"{name}_mul"))
    return nodes, inits, name


def _ffn(form: str) -> onnx.ModelProto:
    """x -> MatMul(dequantized up) + b -> Relu -> MatMul(dequantized down) -> y."""
    rng = np.random.default_rng(0)
    up_nodes, up_inits, up = _dequantized("up_w", HIDDEN, FFN, form, rng)
    down_nodes, down_inits, down = _dequantized("down_w", FFN, HIDDEN, form, rng)
    bias = numpy_helper.from_array(rng.standard_normal(FFN).astype(np.float32), "up_b")
    nodes = [*up_nodes, *down_nodes,
             helper.make_node("MatMul", ["x", up], ["h"], name="up"),
             helper.make_node("Add", ["h", "up_b"], ["hb"], name="up_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", down], ["y"], name="down")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 8, HIDDEN])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 8, HIDDEN])], [*up_inits, *down_inits, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("form", ["per_column", "row_vector", "zero_point", "per_tensor"])
def test_int8_weight_keeps_dtype_and_scale_chain(form: str) -> None:
    model = _ffn(form)
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed
    assert result.report.verification["passed"]
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    stored = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = result.report.layers[[lay.name for lay in result.report.layers].index("up")].kept
    assert len(kept) == FFN // 2
    # the int8 tensors and per-channel parameters are sliced where they are stored
    assert stored["up_w_q"].dtype == np.int8 and stored["down_w_q"].dtype == np.int8
    assert np.array_equal(stored["up_w_q"], before["up_w_q"][:, kept])
    assert np.array_equal(stored["down_w_q"], before["down_w_q"][kept, :])
    if before["up_w_s"].size > 1:
        assert np.array_equal(stored["up_w_s"], before["up_w_s"][..., kept])
    assert np.array_equal(stored["down_w_s"], before["down_w_s"])  # per output: untouched
    assert not any(v.dtype == np.float32 and v.size >= HIDDEN * FFN // 2
                   for v in stored.values()), "a float copy of a weight was written"
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    assert pruned.ByteSize() < model.ByteSize()
    check = verify(model, pruned, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes, opset=17, seed=11)
    assert check, check.summary()


def _tied(form: str) -> onnx.ModelProto:
    """One dequantized int8 weight read by two MatMuls of different groups:
    ``y = down_a(relu(x @ W)) + down_b(relu(-x @ W))``."""
    rng = np.random.default_rng(1)
    nodes, inits, tied = _dequantized("tied_w", HIDDEN, FFN, form, rng)
    for branch in ("a", "b"):
        down_nodes, down_inits, _ = _dequantized(f"down_{branch}", FFN, HIDDEN, form, rng)
        nodes += down_nodes
        inits += down_inits
    nodes += [helper.make_node("Neg", ["x"], ["nx"], name="neg"),
              helper.make_node("MatMul", ["x", tied], ["ha"], name="up_a"),
              helper.make_node("MatMul", ["nx", tied], ["hb"], name="up_b"),
              helper.make_node("Relu", ["ha"], ["ra"], name="act_a"),
              helper.make_node("Relu", ["hb"], ["rb"], name="act_b"),
              helper.make_node("MatMul", ["ra", "down_a"], ["ya"], name="down_a_mm"),
              helper.make_node("MatMul", ["rb", "down_b"], ["yb"], name="down_b_mm"),
              helper.make_node("Add", ["ya", "yb"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 8, HIDDEN])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 8, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("form", ["per_column", "zero_point", "per_tensor"])
def test_shared_int8_weight_sliced_two_ways_keeps_int8(form: str) -> None:
    """Two readers of one int8 weight keep different columns: each gets its own int8 slice
    (a private copy named after the original) and its own scale slice, never a float copy,
    and the weights take fewer bytes than before (this toy model's file is mostly names)."""
    model = _tied(form)
    result = onnx_fpgm.prune(model, 0.5, layer_sparsity=(("up_b", 0.25),))
    layers = {layer.name: layer for layer in result.report.layers}
    kept_a, kept_b = layers["up_a"].kept, layers["up_b"].kept
    assert len(kept_a) == FFN // 2 and len(kept_b) == FFN - FFN // 4
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    stored = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    original = numpy_helper.to_array(next(t for t in model.graph.initializer
                                          if t.name == "tied_w_q"))
    tied = {name: value for name, value in stored.items() if name.startswith("tied_w_q")}
    assert all(v.dtype == np.int8 for v in tied.values()), {k: v.dtype for k, v in tied.items()}
    slices = sorted(tuple(map(tuple, v.T)) for v in tied.values())
    assert slices == sorted(tuple(map(tuple, original[:, k].T)) for k in (kept_a, kept_b))
    assert not any(v.dtype == np.float32 and v.size >= HIDDEN * FFN // 4
                   for v in stored.values()), "a float copy of a weight was written"
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert sum(v.nbytes for v in stored.values()) < weight_bytes
    check = verify(model, pruned, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes, opset=17, seed=11)
    assert check, check.summary()


def _grouped_conv() -> onnx.ModelProto:
    """conv1 -> Relu -> grouped conv (2 groups, weight ``Mul(Cast(W_int8), scale)`` per output
    channel) -> Relu -> head: conv1's channels reach the grouped conv's per-group input slices."""
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "g_q"),
             numpy_helper.from_array((rng.random((8, 1, 1, 1)) * 0.02 + 0.01)
                                     .astype(np.float32), "g_s"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
                                     "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
                                     "w3")]
    nodes = [helper.make_node("Cast", ["g_q"], ["g_f"], to=TensorProto.FLOAT, name="g_cast"),
             helper.make_node("Mul", ["g_f", "g_s"], ["g_w"], name="g_mul"),
             helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="act1"),
             helper.make_node("Conv", ["ra", "g_w"], ["b"], name="gconv", group=2,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="act2"),
             helper.make_node("Conv", ["rb", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 4, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_grouped_conv_int8_weight_keeps_int8() -> None:
    """A grouped conv's per-group input slices (``map_input``) are taken in the int8 tensor;
    the per-output scale is broadcast along the inputs and stays (sliced only with outputs)."""
    model = _grouped_conv()
    result = onnx_fpgm.prune(model, 0.5)
    layers = {layer.name: layer for layer in result.report.layers}
    assert len(layers["conv1"].kept) == 4 and len(layers["gconv"].kept) == 4
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert stored["g_q"].dtype == np.int8 and stored["g_q"].shape == (4, 2, 3, 3)
    assert stored["g_s"].shape == (4, 1, 1, 1)
    assert not any(v.dtype == np.float32 and v.shape[:2] == (4, 2) for v in stored.values())
    check = verify(model, result.model, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes, opset=17, seed=11)
    assert check, check.summary()

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

"""Old exporters' form: every initializer also listed as a graph input (issue 20).

PyTorch 1.2 exports (``keep_initializers_as_inputs``) and CenterFace list every weight among
the graph inputs, at IR 4 and later. Those are weights: pruned, and kept as graph inputs with
their new shapes. A model that lists only some initializers keeps those as overridable
defaults (``test_regressions.test_initializer_that_is_also_a_graph_input_stays_an_input``).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import check_pruned


def _list_initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    listed = {v.name for v in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            model.graph.input.append(helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    return model


def _helper_ir4() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm at IR 4
    (opset 9), every initializer listed among the inputs."""
    rng = np.random.default_rng(0)

    def arr(name, *shape, low=None):
        values = rng.standard_normal(shape).astype(np.float32)
        if low is not None:
            values = np.abs(values) + low
        return numpy_helper.from_array(values, name)

    inits = [arr("w1", 16, 3, 3, 3), arr("b1", 16), arr("gamma", 16, low=0.5),
             arr("beta", 16), arr("mean", 16), arr("var", 16, low=0.5),
             arr("w2", 8, 16, 3, 3), arr("fc_w", 5, 8), arr("fc_b", 5)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"],
                              ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "ir4", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 16, 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    return _list_initializers_as_inputs(model)


def _torch_export(dynamo: bool) -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                           nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    args = (torch.randn(1, 3, 16, 16),)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "m.onnx")
        if dynamo:
            torch.onnx.export(module, args, path, input_names=["input"], dynamo=True,
                              external_data=False, output_names=["output"])
            return _list_initializers_as_inputs(onnx.load(path))
        torch.onnx.export(module, args, path, input_names=["input"], output_names=["output"],
                          dynamo=False, opset_version=11, keep_initializers_as_inputs=True)
        return onnx.load(path)


FORMS = {"helper_ir4": _helper_ir4,
         "torchscript_keep_initializers": lambda: _torch_export(False),
         "dynamo_initializers_added": lambda: _torch_export(True)}


@pytest.mark.parametrize("form", [
    pytest.param(name, marks=pytest.mark.torch_export) if "torch" in name or "dynamo" in name
    else name for name in FORMS])
def test_every_initializer_listed_as_input_is_a_weight(form: str) -> None:
    model = FORMS[form]()
    listed = {v.name for v in model.graph.input}
    assert all(t.name in listed for t in model.graph.initializer)
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed, result.report.notes
    assert result.report.verification["passed"]
    assert any("listed as graph inputs" in note for note in result.report.notes)
    check_pruned(model, result)
    # kept as inputs, each with its initializer's new shape
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    for value in result.model.graph.input:
        if value.name in shapes:
            assert [d.dim_value for d in value.type.tensor_type.shape.dim] == \
                shapes[value.name], value.name
    assert result.report.after.params < result.report.before.params
    import onnxruntime as ort  # the pruned model runs, its defaults taken

    session = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    session.run(None, {model.graph.input[0].name: np.zeros([1, 3, 16, 16], np.float32)})

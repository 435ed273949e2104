"""The differentiable executor (recover/torch_graph.py) against onnxruntime, its parameters and
its refusals."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnx_fpgm.errors import ConfigError
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.recover.torch_graph import TorchGraph, float_feeds, trainable_names, write_back
from tests import torch_models
from tests.onnx_patterns import PATTERNS

ONNX_PATTERNS = ["conv_bn_relu_conv", "conv_bn_unfolded_vs_folded", "symbolic_batch",
                 "layer_norm_over_channels", "paddle_constant_weights", "nchw_flatten_gemm",
                 "channels_last_transpose_matmul", "squeeze_unsqueeze", "split_opset11_attr",
                 "split_opset18_num_outputs", "slice_channel_partial_residual", "resize_scales",
                 "resize_sizes", "pad_channel", "channel_shuffle", "softmax_channel_axis",
                 "depthwise", "grouped_conv", "convtranspose_producer_consumer", "se_block",
                 "se_block_reducemean_hardsigmoid", "mlp_matmul_add_gelu", "gemm_mlp",
                 "instance_norm", "prelu_per_channel"]
TORCH_MODELS = ["resnet18_like", "mobilenetv3_small_like", "unet_like", "yolov8_like",
                "vit_like"]


def _assert_matches_onnxruntime(model: onnx.ModelProto) -> None:
    feeds = random_inputs(model, seed=3)
    graph = TorchGraph(model)
    with torch.no_grad():
        env = graph.run(float_feeds(feeds, graph, graph.device))
    want = make_session(model).run(None, feeds)
    for name, expected in zip(graph.outputs, want):
        have = env[name].numpy()
        assert have.shape == expected.shape, name
        scale = max(float(np.abs(expected).max()), 1e-6)
        assert float(np.abs(have - expected).max()) / scale <= 1e-4, name


@pytest.mark.parametrize("name", ONNX_PATTERNS)
def test_executor_equals_onnxruntime_on_patterns(name: str) -> None:
    _assert_matches_onnxruntime(PATTERNS[name].build())


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_executor_equals_onnxruntime_on_torch_exports(name: str, dynamo: bool) -> None:
    _assert_matches_onnxruntime(torch_models.export_built(torch_models.ZOO[name], dynamo=dynamo))


def test_gradients_reach_every_trainable_weight() -> None:
    model = PATTERNS["conv_bn_unfolded_vs_folded"].build()
    graph = TorchGraph(model)
    names = set(trainable_names(model))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert {bn.input[1], bn.input[2]} <= names  # scale and bias learn
    assert not {bn.input[3], bn.input[4]} & names  # running statistics stay fixed
    env = graph.run(float_feeds(random_inputs(model, 0), graph, graph.device))
    sum(env[o].square().sum() for o in graph.outputs).backward()
    assert set(graph.params) == names
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.params.values())


def test_unknown_op_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError, match="LpNormalization"):
        TorchGraph(PATTERNS["unknown_op"].build())


def test_write_back_keeps_names_shapes_and_dtypes() -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    graph = TorchGraph(model)
    values = {k: v + 1.0 for k, v in graph.trained_values().items()}
    written = write_back(model, values)
    before = {t.name: t for t in model.graph.initializer}
    for init in written.graph.initializer:
        assert init.data_type == before[init.name].data_type
        assert list(init.dims) == list(before[init.name].dims)
        stored = onnx.numpy_helper.to_array(init)
        if init.name in values:
            np.testing.assert_array_equal(stored, values[init.name])
        else:
            np.testing.assert_array_equal(stored, onnx.numpy_helper.to_array(before[init.name]))
    assert [n.name for n in written.graph.node] == [n.name for n in model.graph.node]


def test_scalar_gather_of_a_shape() -> None:
    """YOLOv8's head reads one dim of a Shape with a scalar index (a 0-d result)."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "two"], ["height"], axis=0),
             helper.make_node("Cast", ["height"], ["scale"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "scale"], ["y"])]
    graph = helper.make_graph(
        nodes, "scalar_gather", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])],
        [numpy_helper.from_array(np.array(2, np.int64), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _assert_matches_onnxruntime(model)

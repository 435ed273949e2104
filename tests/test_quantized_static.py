"""QDQ models pruned exactly: onnxruntime's ``quantize_static`` output and hand-built forms.

Checked by the quantized oracle (``onnx_fpgm.oracle.qdq``): removed channels' consumer weights set to
their zero point, compared with the activation Q/DQ pairs bypassed (float, 1e-4), and the real
quantized models (onnxruntime's integer kernels) compared in quantization steps. Structure: the
stored integers stay integers, every per-axis scale/zero point matches its weight's axis, int32
biases match their layer's outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_fpgm
import onnx_fpgm.oracle.validate
from tests.conftest import check_pruned, pruned_layers
from tests.quantized_models import STATIC_MODELS, hand_built, static

pytest.importorskip("onnxruntime.quantization")
pytestmark = pytest.mark.torch_export


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _check_quantizers(model: onnx.ModelProto) -> None:
    """Every DequantizeLinear of a stored integer weight: per-axis parameters fit its axis."""
    stored = _initializers(model)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in stored:
            continue
        data, scale = stored[node.input[0]], stored.get(node.input[1])
        assert data.dtype.kind in "iu", node.name
        if scale is not None and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert scale.shape == (data.shape[axis],), node.name
            if len(node.input) > 2 and node.input[2]:
                assert stored[node.input[2]].shape == scale.shape, node.name


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", STATIC_MODELS)
def test_quantize_static_qdq(name: str, per_channel: bool, sparsity: float) -> None:
    model = static(name, "qdq", per_channel)
    result = onnx_fpgm.prune(model, sparsity)
    check_pruned(model, result)
    _check_quantizers(result.model)
    verification = result.report.verification
    assert "bypassed" in verification["summary"]
    # onnxruntime's integer kernels sum exactly: zero-point weights add nothing.
    assert "differ by at most 0 quantization step" in verification["summary"]
    report = result.report
    assert report.prunable_channels > 0.8 * report.total_channels
    assert {layer.op for layer in report.layers} >= {"Conv", "Gemm"}
    assert not any("quantized layer" in note or "no prunable" in note for note in report.notes)
    if name == "resnet18_like" and sparsity == 0.5:
        assert report.after.params <= 0.55 * report.before.params


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name", STATIC_MODELS)
def test_quantize_static_qoperator(name: str, sparsity: float) -> None:
    """QLinearConv, com.microsoft QGemm/QLinearAdd/QLinearGlobalAveragePool: pruned, and the
    pruned model equals its masked original (weights at their zero point) bit for bit."""
    model = static(name, "qoperator", True)
    result = onnx_fpgm.prune(model, sparsity)
    check_pruned(model, result)
    report = result.report
    assert "bit for bit" in report.verification["summary"]
    assert {layer.op for layer in report.layers} == {"QLinearConv", "QGemm"}
    assert report.prunable_channels > 0.8 * report.total_channels
    assert not any("QOperator" in note for note in report.notes)
    stored = _initializers(result.model)
    for node in result.model.graph.node:
        if node.op_type == "QLinearConv":
            weight, scale, bias = (stored[node.input[i]] for i in (3, 4, 8))
            assert weight.dtype == np.int8 and bias.dtype == np.int32
            assert scale.shape == bias.shape == (weight.shape[0],)
    if name == "resnet18_like" and sparsity == 0.5:
        assert report.after.params <= 0.55 * report.before.params


def _weight_behind_dequantize(graph: onnx.GraphProto, layer: str) -> str:
    """QDQ: the stored integers behind the Conv's DequantizeLinear weight."""
    conv = next(n for n in graph.node if n.op_type == "Conv" and n.name == layer)
    return next(n for n in graph.node if conv.input[1] in n.output).input[0]


def _qoperator_weight(graph: onnx.GraphProto, layer: str) -> str:
    """QOperator: QLinearConv's integer weight input."""
    return next(n for n in graph.node if n.name == layer).input[3]


@pytest.mark.parametrize("fmt,find_weight", [("qdq", _weight_behind_dequantize),
                                              ("qoperator", _qoperator_weight)])
def test_the_quantized_oracle_catches_a_wrong_kept_weight(fmt: str, find_weight) -> None:
    """The check can fail: one kept integer of a pruned layer changed -> verification fails
    (QDQ: float comparison with activation pairs bypassed; QOperator: bit for bit)."""
    model = static("resnet18_like", fmt, True)
    result = onnx_fpgm.prune(model, 0.5)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    name = find_weight(broken.graph, sorted(pruned_layers(result))[0])
    tensor = next(t for t in broken.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor).copy()
    values.reshape(-1)[0] = 127 if values.reshape(-1)[0] != 127 else -127
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    check = onnx_fpgm.oracle.validate.verify(
        onnx_fpgm.model.io.infer_shapes(model), broken, analysis=result.analysis,
        removed_classes=result.plan.removed_classes, opset=onnx_fpgm.model.io.default_opset(model))
    assert not check


@pytest.mark.parametrize("form", ["per_channel_activations", "fake_quant_weights",
                                  "quantized_bias"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_hand_built_qdq_forms(form: str, sparsity: float) -> None:
    model = hand_built(form)
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, sparsity)
    assert pruned_layers(result) == {"conv1", "conv2"}
    check_pruned(model, result)
    _check_quantizers(result.model)
    stored = _initializers(result.model)
    kept = {layer.name: layer.channels_after for layer in result.report.layers}
    if form == "per_channel_activations":
        assert stored["conv1_act.scale"].shape == (kept["conv1"],)
        assert stored["conv1_act.zp"].shape == (kept["conv1"],)
    if form == "quantized_bias":
        assert stored["conv2.bias_q"].dtype == np.int32
        assert stored["conv2.bias_q"].shape == stored["conv2.bias_scale"].shape == (kept["conv2"],)
    if form == "fake_quant_weights":
        assert stored["conv1.weight"].dtype == np.float32
        assert stored["conv1.w_scale"].shape == (kept["conv1"],)


def test_blocked_weights_block_with_a_reason() -> None:
    """Blocked (opset 21) quantization is left whole: its scales span blocks of input rows."""
    model = hand_built("blocked_weights")
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert not pruned_layers(result)
    reason = next(g.frozen for g in result.report.groups if "conv1" in g.producers)
    assert "blocked quantization" in reason and "block_size=4" in reason


def test_shared_quantized_weight_gets_a_private_quantizer() -> None:
    """One DequantizeLinear read by two convs pruned differently: each gets its own slice."""
    model = hand_built("quantized_bias")
    graph = model.graph
    conv3 = next(n for n in graph.node if n.name == "conv3")
    # conv3 reads conv2's activations; make a second head reading the same weight as conv3
    extra = onnx.helper.make_node("Conv", [conv3.input[0], conv3.input[1]], ["output2"],
                                  name="conv3b", pads=[1, 1, 1, 1])
    graph.node.append(extra)
    graph.output.append(onnx.helper.make_tensor_value_info("output2", onnx.TensorProto.FLOAT,
                                                           [1, 4, 8, 8]))
    result = onnx_fpgm.prune(model, 0.5)
    assert pruned_layers(result) == {"conv1", "conv2"}
    check_pruned(model, result)
    _check_quantizers(result.model)


def test_dynamic_quantize_linear_blocks_the_channels_it_reads() -> None:
    """DynamicQuantizeLinear's scale comes from all channels: a conv feeding it stays whole."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.integers(-100, 100, (4, 8, 1, 1)).astype(np.int8),
                                     "w2_q"),
             numpy_helper.from_array(np.int8(0), "w2_zp")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("DynamicQuantizeLinear", ["r1"], ["x_q", "x_s", "x_zp"],
                              name="dql"),
             helper.make_node("ConvInteger", ["x_q", "w2_q", "x_zp", "w2_zp"], ["acc"],
                              name="conv2"),
             helper.make_node("Cast", ["acc"], ["accf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "x_s"], ["output"], name="rescale")]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                         [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert not pruned_layers(result)
    reason = next(g.frozen for g in result.report.groups if "conv1" in g.producers)
    assert "DynamicQuantizeLinear dql computes one scale from all channels" in reason
    assert any("ConvInteger conv2" in note for note in result.report.notes)


@pytest.mark.parametrize("name", ["vit_like", "shufflenet_like"])
def test_qdq_split_channel_axes(name: str) -> None:
    """Per-tensor Q/DQ on attention heads and a channel shuffle pass the split axis whole."""
    model = static(name, "qdq", True)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    report = result.report
    assert not any("split channel axis" in (g.frozen or "") for g in report.groups)
    if name == "vit_like":
        heads = [g for g in report.groups if g.heads]
        assert heads and all(g.channels_after < g.channels_before for g in heads)
    else:
        assert report.prunable_channels > 0.9 * report.total_channels


def test_qoperator_concat_and_average_pool() -> None:
    """DenseNet-like QOperator: com.microsoft QLinearConcat and QLinearAveragePool pass
    channels (Concat offsets, pooling), bit for bit."""
    model = static("densenet_like", "qoperator", True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QLinearConcat", "QLinearAveragePool"} <= ops
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert "bit for bit" in result.report.verification["summary"]
    assert result.report.prunable_channels > 0.9 * result.report.total_channels



def test_sensitivity_masks_refuse_integer_inputs() -> None:
    """A QOperator layer reads integers: a multiplicative mask cannot stand for a removed
    channel (that is its zero point), so the sensitivity measurement says so instead of
    measuring something else."""
    from onnx_fpgm.planning.sensitivity import build_masked_model

    model = static("resnet18_like", "qoperator")
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    with pytest.raises(onnx_fpgm.ConfigError, match="sensitivity allocation cannot mask"):
        build_masked_model(result.original, result.analysis)


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_targets_on_quantized_models(fmt: str, metric: str) -> None:
    """QLinearConv/QGemm MACs are counted like Conv/Gemm, and integer weights (behind
    DequantizeLinear, or read by a QOperator layer) are params the cost model slices: a
    target is met as on the float model, and the count agrees with the cost model."""
    model = static("resnet18_like", fmt, True)
    result = onnx_fpgm.prune(model, **{f"target_{metric}": 0.5}, allocation="global")
    before, after = result.report.before, result.report.after
    assert before.macs > 10_000_000 and before.params > 700_000
    achieved = getattr(after, metric) / getattr(before, metric)
    assert 0.45 <= achieved <= 0.5 + 1e-12
    assert result.report.target.estimated == pytest.approx(achieved, abs=1e-9)  # exact here
    check_pruned(model, result)

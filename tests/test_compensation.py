"""Calibration data, criteria and compensation (accuracy without retraining)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration
from tests.conftest import run_outputs
from tests.onnx_patterns import PATTERNS


def _constant_channel_model() -> onnx.ModelProto:
    """conv1 has two zero filters (constant outputs = relu(bias)) and two large random ones;
    FPGM removes the two zero filters at 0.5; conv2 is 1x1, so the mean is exact everywhere."""
    rng = np.random.default_rng(1)
    w1 = np.zeros((4, 3, 3, 3), np.float32)
    w1[2:] = 3 * rng.standard_normal((2, 3, 3, 3))
    b1 = np.array([0.7, 1.3, 0.1, -0.2], np.float32)
    w2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": b1, "w2": w2}.items()]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["a"], name="conv1",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["output"], name="conv2")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                             [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                             [1, 5, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calibration(tmp_path, model, n=8, seed=0, **extra) -> str:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = rng.standard_normal((n, *shape[1:])).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, input=data, **extra)
    return str(path)


def test_bias_compensation_is_exact_for_constant_channels(tmp_path) -> None:
    model = _constant_channel_model()
    plain = onnx_fpgm.prune(model, 0.5)
    assert plain.report.layers[0].kept == [2, 3]
    result = onnx_fpgm.prune(model, 0.5, compensate="bias",
                             calibration=_calibration(tmp_path, model))
    assert result.report.compensation == "bias"
    for want, have in zip(run_outputs(model, seed=5), run_outputs(result.model, seed=5)):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    # Without compensation the output is off by the removed channels' contribution.
    diff = np.abs(run_outputs(model, 5)[0] - run_outputs(plain.model, 5)[0]).max()
    assert diff > 0.1


@pytest.mark.parametrize("mode", ["bias", "lstsq", "auto"])
@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "nchw_flatten_gemm", "se_block",
                                  "mlp_matmul_add_gelu", "concat_skip",
                                  "paddle_constant_weights"])
def test_compensation_keeps_a_valid_graph(tmp_path, name: str, mode: str) -> None:
    model = PATTERNS[name].build()
    result = onnx_fpgm.prune(model, 0.5, compensate=mode,
                             calibration=_calibration(tmp_path, model))
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    for value in run_outputs(result.model):
        assert np.isfinite(value).all()
    assert result.report.fidelity
    # Replaced weights leave the model: it is as small as the plain rewrite (+ new biases).
    plain = onnx_fpgm.prune(model, 0.5)
    bias_allowance = sum(lay.channels_after for lay in result.report.layers)
    assert result.report.after.params <= plain.report.after.params + bias_allowance


@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "nchw_flatten_gemm", "concat_skip"])
def test_lstsq_reduces_output_error(tmp_path, name: str) -> None:
    model = PATTERNS[name].build()
    calib = _calibration(tmp_path, model, n=32)
    none = onnx_fpgm.prune(model, 0.5, compensate="none", calibration=calib)
    lstsq = onnx_fpgm.prune(model, 0.5, compensate="lstsq", calibration=calib)
    err_none = none.report.fidelity_data[0]["relative_error"]
    err_lstsq = lstsq.report.fidelity_data[0]["relative_error"]
    assert err_lstsq < err_none


def test_bias_without_data_uses_batchnorm_statistics() -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    result = onnx_fpgm.prune(model, 0.5, compensate="bias")
    assert result.report.compensation == "bias"
    assert not any("not compensated" in n for n in result.report.notes)


def test_auto_needs_calibration() -> None:
    with pytest.raises(onnx_fpgm.ConfigError, match="calibration"):
        onnx_fpgm.prune(PATTERNS["conv_bn_relu_conv"].build(), 0.5, compensate="auto")


@pytest.mark.parametrize("criterion", ["fpgm", "l1", "l2", "random"])
def test_criteria_all_prune_exactly(criterion: str) -> None:
    from tests.conftest import check_pruned

    model = PATTERNS["se_block"].build()
    result = onnx_fpgm.prune(model, 0.5, criterion=criterion)
    check_pruned(model, result)
    again = onnx_fpgm.prune(model, 0.5, criterion=criterion)
    assert [lay.kept for lay in again.report.layers] == [lay.kept for lay in result.report.layers]


def test_l1_removes_smallest_norms() -> None:
    model = _constant_channel_model()
    result = onnx_fpgm.prune(model, 0.5, criterion="l1")
    assert result.report.layers[0].kept == [2, 3]


@pytest.mark.parametrize("arrays,match", [
    ({"wrong": np.zeros((2, 3, 8, 8), np.float32)}, "not graph inputs"),
    ({}, "no array for graph input"),
    ({"input": np.zeros((2, 3, 8, 8), np.float64)}, "dtype"),
    ({"input": np.zeros((2, 3, 8), np.float32)}, "dims"),
    ({"input": np.zeros((2, 4, 8, 8), np.float32)}, "size 4 on axis 1"),
    ({"input": np.zeros((0, 3, 8, 8), np.float32)}, "no samples"),
    ({"input": np.zeros((2, 3, 8, 8), np.float32), "labels": np.zeros(3, np.int64)},
     "labels"),
    ({"input": np.zeros((2, 3, 8, 8), np.float32), "labels": np.zeros(2, np.float32)},
     "labels"),
], ids=["name", "missing", "dtype", "rank", "static-dim", "empty", "label-count",
        "label-dtype"])
def test_npz_reader_rejects_bad_data(tmp_path, arrays, match) -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(onnx_fpgm.ConfigError, match=match):
        load_calibration(path, model)


def test_npz_reader_rejects_non_npz(tmp_path) -> None:
    path = tmp_path / "x.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(onnx_fpgm.ConfigError, match="readable"):
        load_calibration(path, PATTERNS["conv_bn_relu_conv"].build())


def test_mnist_lstsq_keeps_accuracy_on_held_out_data() -> None:
    """The shipped trained model: plain removal at 0.5 collapses, lstsq recovers (held out)."""
    from pathlib import Path

    models = Path(__file__).parents[1] / "models"
    result = onnx_fpgm.prune(models / "mnist_resnet.onnx", 0.5, compensate="lstsq",
                             calibration=str(models / "mnist_calib.npz"),
                             evaluation=str(models / "mnist_eval.npz"))
    data = result.report.fidelity_data[0]
    assert result.report.fidelity_on == "evaluation"
    assert data["accuracy_original"] >= 0.99
    assert data["accuracy_pruned"] >= data["accuracy_original"] - 0.02

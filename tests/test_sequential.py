"""``--compensate sequential``: each consumer refitted on its actual (already compensated) input
in one walk, against the original layer's output."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import run_outputs
from tests.onnx_patterns import PATTERNS

DEPTH, WIDTH, SIDE, RANK = 8, 8, 6, 4


def _deep_chain(auto_pad_last: bool = False) -> onnx.ModelProto:
    """``DEPTH`` 3x3 Conv -> Relu layers of ``WIDTH`` channels, filters near rank ``RANK`` (so
    half the channels can be compensated): every consumer sees the drift of all the layers
    before it, which a fit on the original inputs ignores. ``auto_pad_last``: the last Conv pads
    by ``auto_pad`` (a form the fit does not unfold)."""
    rng = np.random.default_rng(7)
    inits, nodes, x = [], [], "input"
    for i in range(DEPTH):
        c_in = 3 if i == 0 else WIDTH
        w = rng.standard_normal((WIDTH, RANK)) @ rng.standard_normal((RANK, c_in * 9)) / \
            np.sqrt(RANK) + 0.2 * rng.standard_normal((WIDTH, c_in * 9))
        w = w.reshape(WIDTH, c_in, 3, 3) / np.sqrt(c_in * 9 * 0.5)
        b = 0.1 * rng.standard_normal(WIDTH)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        padding = {"auto_pad": "SAME_UPPER"} if auto_pad_last and i == DEPTH - 1 else \
            {"pads": [1, 1, 1, 1]}
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      **padding))
        if i < DEPTH - 1:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                       ["n", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", WIDTH, SIDE, SIDE])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(tmp_path, name: str, n: int, seed: int, shape=(3, SIDE, SIDE)) -> str:
    data = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    path = tmp_path / f"{name}.npz"
    np.savez(path, input=data)
    return str(path)


def _relative_error(result) -> float:
    return result.report.fidelity_data[0]["relative_error"]


def test_sequential_beats_the_fit_on_original_inputs(tmp_path) -> None:
    model = _deep_chain()
    calib, held = _data(tmp_path, "calib", 32, 0), _data(tmp_path, "held", 16, 1)
    errors = {mode: _relative_error(onnx_fpgm.prune(model, 0.5, compensate=mode,
                                                    calibration=calib, evaluation=held))
              for mode in ("none", "obs", "sequential")}
    assert errors["obs"] < errors["none"]
    # measured 2026-12-03: none 0.882, obs 0.428, sequential 0.345 (lstsq 0.342)
    assert errors["sequential"] < 0.9 * errors["obs"], errors


def test_sequential_keeps_the_pruned_interface(tmp_path) -> None:
    model = _deep_chain()
    calib = _data(tmp_path, "calib", 16, 0)
    plain = onnx_fpgm.prune(model, 0.5)
    result = onnx_fpgm.prune(model, 0.5, compensate="sequential", calibration=calib)
    assert result.report.compensation == "sequential"
    assert any(n.startswith("sequential: refitted 7 layer(s)") for n in result.report.notes)
    onnx.checker.check_model(result.model, full_check=True)
    for got, want in ((result.model.graph.input, plain.model.graph.input),
                      (result.model.graph.output, plain.model.graph.output)):
        assert [v.SerializeToString() for v in got] == [v.SerializeToString() for v in want]
    assert [n.name for n in result.model.graph.node] == [n.name for n in plain.model.graph.node]
    dims = {t.name: list(t.dims) for m in (plain.model, result.model)
            for t in m.graph.initializer}
    plain_nodes = {n.name: n for n in plain.model.graph.node}
    for node in result.model.graph.node:  # refitted weights: private copies, same shapes
        for index, name in enumerate(node.input[1:], 1):
            was = plain_nodes[node.name].input[index]
            assert dims[name] == dims[was]
            assert name == was or name.startswith(f"{node.name}_refit")
    for value in run_outputs(result.model):
        assert np.isfinite(value).all()


def test_a_layer_the_fit_cannot_take_gets_the_bias_fold(tmp_path) -> None:
    model = _deep_chain(auto_pad_last=True)
    result = onnx_fpgm.prune(model, 0.5, compensate="sequential",
                             calibration=_data(tmp_path, "calib", 16, 0))
    assert "sequential: refitted 6 layer(s)" in " ".join(result.report.notes)
    assert "conv7: sequential fit not applicable (a Conv form the statistics do not unfold); " \
        "bias compensation instead" in result.report.notes
    bias = next(n for n in result.model.graph.node if n.name == "conv7").input[2]
    assert bias.startswith("conv7_compensated_bias")


def test_a_graph_the_executor_cannot_run_gets_the_obs_update(tmp_path) -> None:
    model = _deep_chain()
    model.graph.node[-1].output[0] = "last"  # an op the torch executor has no rule for
    model.graph.node.append(helper.make_node("LpNormalization", ["last"], ["output"],
                                             name="lpnorm", axis=1, p=2))
    result = onnx_fpgm.prune(model, 0.5, compensate="sequential",
                             calibration=_data(tmp_path, "calib", 16, 0))
    assert any("LpNormalization" in n and "obs update instead" in n
               for n in result.report.notes), result.report.notes


@pytest.mark.parametrize("name", ["nchw_flatten_gemm", "mlp_matmul_add_gelu", "concat_skip"])
def test_sequential_on_patterns_reduces_the_error(tmp_path, name: str) -> None:
    model = PATTERNS[name].build()
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = _data(tmp_path, "calib", 32, 0, tuple(shape[1:]))
    none = onnx_fpgm.prune(model, 0.5, calibration=calib)
    result = onnx_fpgm.prune(model, 0.5, compensate="sequential", calibration=calib)
    onnx.checker.check_model(result.model, full_check=True)
    assert _relative_error(result) < _relative_error(none)

"""Group scoring: one producer = the single-layer FPGM core; several = joint, unit-norm space."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.importance.fpgm import fpgm_select
from onnx_fpgm.planning.plan import n_to_keep
from tests.conftest import check_pruned


def _conv_model(weights: dict[str, np.ndarray], nodes, out_channels: int):
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("dist", [1, 2])
def test_single_producer_group_matches_core(rng, sparsity: float, dist: int) -> None:
    w1 = rng.standard_normal((12, 3, 3, 3))
    w2 = rng.standard_normal((4, 12, 1, 1))
    model = _conv_model({"w1": w1, "w2": w2}, [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="head")], 4)
    result = onnx_fpgm.prune(model, sparsity, dist=dist)
    conv1 = next(layer for layer in result.report.layers if layer.name == "conv1")
    pruned = fpgm_select(w1.astype(np.float32), sparsity, dist=dist, device="cpu")
    assert sorted(set(range(12)) - set(conv1.kept)) == pruned.tolist()
    check_pruned(model, result)


def test_multi_producer_group_uses_unit_norm_joint_space() -> None:
    """Two convs summed by Add: channel c = [W1[c]/|W1|, W2[c]/|W2|].

    Hand-checkable: W1 has filters e0, e0, 3*e0, 10*e1 (scaled by 100, so it would dominate a
    raw concatenation); W2 has filters e2, 5*e2, e2, e2. After unit-norm scaling, the joint
    filters' pairwise distances make channel 0 the one closest to all others (its W1 part sits
    near the median and its W2 part equals the majority), so at sparsity 0.25 channel 0 goes.
    Without the normalisation W1 (x100) would decide alone and tie channels 0 and 1.
    """
    e = np.eye(27).reshape(27, 3, 3, 3)
    w1 = 100.0 * np.stack([e[0], e[0], 3 * e[0], 10 * e[1]])
    w2 = np.stack([e[2], 5 * e[2], e[2], e[2]])
    head = np.ones((2, 4, 1, 1))
    model = _conv_model({"w1": w1, "w2": w2, "wh": head}, [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wh"], ["y"], name="head")], 2)
    result = onnx_fpgm.prune(model, 0.25)
    group = next(g for g in result.report.groups if "conv_a" in g.producers)
    assert set(group.producers) == {"conv_a", "conv_b"}
    # Reference computed by hand-rolled numpy: joint unit-norm rows, L2 distance sums.
    j1 = w1.reshape(4, -1) / np.linalg.norm(w1)
    j2 = w2.reshape(4, -1) / np.linalg.norm(w2)
    joint = np.concatenate([j1, j2], axis=1)
    sums = np.sqrt(((joint[:, None] - joint[None]) ** 2).sum(-1)).sum(1)
    assert int(np.argmin(sums)) == 0
    kept = [layer.kept for layer in result.report.layers if layer.name == "conv_a"][0]
    assert kept == [1, 2, 3]
    check_pruned(model, result)


@pytest.mark.parametrize("n,s,min_ch,round_to,expected", [
    (16, 0.5, 1, None, 8), (10, 0.25, 1, None, 8), (7, 0.5, 1, None, 3),  # round(3.5) == 4
    (16, 1.0, 1, None, 1), (16, 1.0, 3, None, 3), (16, 0.3, 1, 8, 16), (64, 0.5, 1, 8, 32),
    (40, 0.3, 1, 8, 32), (6, 0.5, 1, 8, 6), (20, 0.1, 1, 8, 20), (16, 0.0, 1, 8, 16),
])
def test_n_to_keep(n, s, min_ch, round_to, expected) -> None:
    assert n_to_keep(n, s, min_ch, round_to) == expected

"""Fidelity per output part: a detection head's class scores are judged on their own."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.measure.fidelity import output_parts
from onnx_fpgm.planning.sensitivity import output_loss


def _head(rng, n=2, classes=16, anchors=400):
    boxes = rng.uniform(0, 640, (n, 4, anchors))
    scores = rng.uniform(0, 0.05, (n, classes, anchors))
    hot = rng.choice(anchors, 30, replace=False)
    scores[:, 3, hot] = rng.uniform(0.6, 0.95, (n, 30))
    return np.concatenate([boxes, scores], 1).astype(np.float32)


def test_collapsed_scores_are_visible_beside_healthy_boxes(rng) -> None:
    want = _head(rng)
    have = want.copy()
    have[:, 4:] = rng.uniform(0, 0.05, have[:, 4:].shape)  # class scores collapse, boxes intact
    whole = output_parts(want.reshape(2, -1), have.reshape(2, -1))
    assert whole[0].cosine > 0.999  # one cosine over everything says "fine"
    parts = output_parts(want, have, "output0")
    assert [p.name for p in parts] == ["output0[0:4]", "output0[4:20]"]
    boxes, scores = parts
    assert boxes.relative_error == 0 and boxes.top1 is None
    assert scores.agreement == "top-100" and scores.top1 < 0.5
    assert scores.relative_error > 0.5
    assert output_loss([want], [have], None) >= 0.5


def test_transposed_head_and_identical_outputs(rng) -> None:
    want = np.moveaxis(_head(rng), 1, 2)  # (N, anchors, 4 + classes)
    parts = output_parts(want, want.copy())
    assert len(parts) == 2 and parts[1].top1 == 1.0 and parts[1].relative_error == 0


def test_plain_outputs_are_one_part(rng) -> None:
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    (part,) = output_parts(logits, logits, "logits")
    assert part.top1 == 1.0 and part.agreement == "top-1"
    feature = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    assert len(output_parts(feature, feature)) == 1


def _detector() -> onnx.ModelProto:
    """conv1 -> relu -> two 1x1 heads: boxes (4, unbounded) and Sigmoid class scores (6),
    concatenated to (1, 10, 64) like a YOLO head; conv1 is the prunable group."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
             "wb": rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * 20,
             "wc": rng.standard_normal((6, 16, 1, 1)).astype(np.float32),
             "shape": np.array([1, 10, 64], np.int64)}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wb"], ["b"], name="box"),
             helper.make_node("Conv", ["r", "wc"], ["c0"], name="cls"),
             helper.make_node("Sigmoid", ["c0"], ["c"], name="sig"),
             helper.make_node("Concat", ["b", "c"], ["cat"], name="cat", axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["output"], name="flat")]
    graph = helper.make_graph(
        nodes, "det", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10, 64])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_report_lists_fidelity_per_part(tmp_path) -> None:
    model = _detector()
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(
        np.float32))
    result = onnx_fpgm.prune(model, target_macs=0.6, calibration=str(path),
                             compensate="auto")
    names = [f["output"] for f in result.report.fidelity_data]
    assert names == ["output[0:4]", "output[4:10]"]
    assert result.report.fidelity_data[1]["agreement"] == "top-64"
    assert any("top-64 agreement" in line for line in result.report.fidelity)
    assert result.report.target.achieved <= 0.6


@pytest.mark.parametrize("labels", [False, True])
def test_loss_is_zero_for_identical_outputs(rng, labels) -> None:
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    y = logits.argmax(1) if labels else None
    assert output_loss([logits], [logits.copy()], y) == 0.0

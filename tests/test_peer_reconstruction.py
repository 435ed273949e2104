"""benchmarks/peer_onnxsim.py: the peer's removed channels rebuilt from its weights, and our
oracle on them, on models pruned by hand with onnx.helper (no onnxsim needed but in the last
test)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fpgm.model.runtime import random_inputs

_SPEC = importlib.util.spec_from_file_location(
    "peer_onnxsim", Path(__file__).resolve().parent.parent / "benchmarks" / "peer_onnxsim.py")
peer = importlib.util.module_from_spec(_SPEC)
sys.modules["peer_onnxsim"] = peer  # dataclasses look their module up there
_SPEC.loader.exec_module(peer)


def _mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, *, gemm: bool = False,
         ) -> onnx.ModelProto:
    """x [4, D] -> MatMul W1 (+ b1) -> Tanh -> MatMul W2 (Gemm with transB for ``gemm``)."""
    d = w1.shape[0]
    second = (helper.make_node("Gemm", ["h", "w2"], ["y"], name="down", transB=1) if gemm
              else helper.make_node("MatMul", ["h", "w2"], ["y"], name="down"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["u"], name="up"),
             helper.make_node("Add", ["u", "b1"], ["v"], name="bias"),
             helper.make_node("Tanh", ["v"], ["h"], name="act"), second]
    out = w2.shape[0] if gemm else w2.shape[1]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, out])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8)


def _weights(rng: np.random.Generator, d: int = 8, hidden: int = 12, out: int = 5):
    return (rng.standard_normal((d, hidden)).astype(np.float32),
            rng.standard_normal(hidden).astype(np.float32),
            rng.standard_normal((hidden, out)).astype(np.float32))


def test_kept_slices_one_and_two_axes(rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 9)).astype(np.float32)
    rows, cols = np.array([0, 2, 5]), np.array([1, 3, 4, 8])
    one = peer.kept_slices(w, w[:, cols])
    assert list(one) == [1] and one[1].tolist() == cols.tolist()
    two = peer.kept_slices(w, w[np.ix_(rows, cols)])
    assert two[0].tolist() == rows.tolist() and two[1].tolist() == cols.tolist()
    assert peer.kept_slices(w, w) == {}


def test_kept_slices_refuses_changed_and_ambiguous_weights(rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 9)).astype(np.float32)
    scaled = w[:, :4] * 1.5  # a peer that compensates keeps no original slice
    with pytest.raises(peer.ValuesChanged):
        peer.kept_slices(w, scaled)
    with pytest.raises(peer.ValuesChanged):
        peer.kept_slices(w, np.ascontiguousarray(w[::2, :4] * 2))
    twin = w.copy()
    twin[:, 5] = twin[:, 2]  # two equal columns: which one was kept cannot be told
    with pytest.raises(peer.NotReconstructible):
        peer.kept_slices(twin, twin[:, [2, 7]])


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_matching_prune_is_exact_and_a_wrong_one_is_not(rng: np.random.Generator,
                                                        gemm: bool) -> None:
    w1, b1, w2 = _weights(rng)
    w2 = np.ascontiguousarray(w2.T) if gemm else w2  # Gemm transB: [out, hidden]
    original = _mlp(w1, b1, w2, gemm=gemm)
    keep = np.array([0, 3, 4, 7, 9, 11])
    other = np.array([1, 3, 4, 7, 9, 11])  # the consumer drops another channel than the producer

    def pruned(consumer_keep: np.ndarray) -> onnx.ModelProto:
        w2p = w2[:, consumer_keep] if gemm else w2[consumer_keep]
        return _mlp(np.ascontiguousarray(w1[:, keep]), b1[keep], np.ascontiguousarray(w2p),
                    gemm=gemm)

    removed = peer.removed_inputs(original, pruned(keep))
    assert list(removed) == ["down"] and removed["down"][0].tolist() == keep.tolist()
    feeds = [random_inputs(original, 0)]
    exact, err, _ = peer.judge(original, pruned(keep), feeds)
    assert exact and err <= 1e-5
    exact, err, detail = peer.judge(original, pruned(other), feeds)
    assert exact is False and err > 1e-2, detail
    heads, widths = peer.touched(original, pruned(keep))
    assert heads == [] and widths == ["down: 12->6"]


def test_refusal_names_what_onnxruntime_rejects(rng: np.random.Generator) -> None:
    w1, b1, w2 = _weights(rng)
    original = _mlp(w1, b1, w2)
    broken = _mlp(np.ascontiguousarray(w1[:, :6]), b1[:6], w2)  # the consumer kept its 12 rows
    feeds = random_inputs(original, 0)
    assert peer.refusal(original, feeds) is None
    assert peer.refusal(broken, feeds)


def _conv_pair(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w2.shape[0], 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8)


def test_conv_consumer_masked_on_channel_axis(rng: np.random.Generator) -> None:
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    keep = np.array([1, 2, 5, 6])
    original = _conv_pair(w1, w2)
    pruned = _conv_pair(np.ascontiguousarray(w1[keep]), np.ascontiguousarray(w2[:, keep]))
    exact, err, detail = peer.judge(original, pruned, [random_inputs(original, 0)])
    assert exact and err <= 1e-5, detail


def _attention(weight: np.ndarray, bias: np.ndarray, wo: np.ndarray,
               heads: int) -> onnx.ModelProto:
    """com.microsoft Attention (packed q|k|v) -> MatMul output projection, hidden 8."""
    nodes = [helper.make_node("Attention", ["x", "w", "b"], ["att"], name="attention",
                              domain="com.microsoft", num_heads=heads),
             helper.make_node("MatMul", ["att", "wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(wo, "wo")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def test_fused_attention_head_removal_counts_as_heads(rng: np.random.Generator) -> None:
    hidden, head = 8, 4  # two heads of 4
    weight = rng.standard_normal((hidden, 3 * hidden)).astype(np.float32)
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    wo = rng.standard_normal((hidden, hidden)).astype(np.float32)
    original = _attention(weight, bias, wo, 2)
    kept = np.arange(head, 2 * head)  # head 1 stays
    cols = np.concatenate([kept, hidden + kept, 2 * hidden + kept])
    pruned = _attention(np.ascontiguousarray(weight[:, cols]), bias[cols],
                        np.ascontiguousarray(wo[kept]), 1)
    heads, widths = peer.touched(original, pruned)
    assert heads == ["attention: num_heads 2->1"] and widths == []
    exact, err, detail = peer.judge(original, pruned, [random_inputs(original, 0)])
    assert exact and err <= 1e-4, detail


def test_onnxsim_on_an_mlp_is_judged_exact(rng: np.random.Generator) -> None:
    pytest.importorskip("onnxsim.pruning", reason="peer onnxsim not installed")
    original = _mlp(*_weights(rng))
    result = peer.run_peer(original, 0.5)
    assert result.runs and result.params_ratio < 1, result.detail
    assert result.exact, result.detail
    assert result.widths_text() == "12->6"
    assert result.verdict().startswith("yes, yes")

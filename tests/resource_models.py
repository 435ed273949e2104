"""Models that cost far more to run or score than their file size says (issue 19's resources):
token attention over the pixels of a dynamic-size image, and a very wide Gemm. Each stays a
small file; ``test_resources.py`` runs the tool on them in a child under a memory cap."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def token_attention_model(heads: int = 4, head_dim: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, H, W), H and W symbolic -> Conv stem -> tokens (N, heads, H*W, head_dim) ->
    softmax(Q K^T) V over the H*W tokens -> back to (N, C, H, W) -> residual -> Conv head.

    The attention matrix is (N, heads, H*W, H*W): 268 MB at 64 x 64, 2.7 GB at 96 x 96 with a
    batch of 2, from a file of a few kB.
    """
    rng = np.random.default_rng(seed)
    width = heads * head_dim

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    def ints(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Conv", ["x", "stem.weight"], ["s"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        helper.make_node("Conv", ["sr", "proj.weight"], ["a"], name="proj"),
        helper.make_node("Reshape", ["a", "heads_shape"], ["q"], name="to_heads"),
        helper.make_node("Transpose", ["q"], ["qt"], name="to_tokens", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qt", "q"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "qt"], ["mixed"], name="mix"),
        helper.make_node("Transpose", ["mixed"], ["mt"], name="from_tokens", perm=[0, 1, 3, 2]),
        helper.make_node("Shape", ["a"], ["a_shape"], name="a_shape"),
        helper.make_node("Reshape", ["mt", "a_shape"], ["back"], name="to_image"),
        helper.make_node("Add", ["back", "a"], ["res"], name="residual"),
        helper.make_node("Conv", ["res", "head.weight"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "token_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [weight("stem.weight", 32, 3, 3, 3), weight("proj.weight", width, 32, 1, 1),
         weight("head.weight", 8, width, 1, 1), ints("heads_shape", [0, heads, head_dim, -1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def wide_gemm_model(outputs: int, features: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x (1, features) -> Gemm (``outputs`` filters of ``features`` weights) -> Relu -> Gemm to
    2 outputs: one prunable group of ``outputs`` channels, ``outputs * features`` floats."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((outputs, features), dtype=np.float32)
    w2 = rng.standard_normal((2, outputs), dtype=np.float32)
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "fc2.weight"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(
        nodes, "wide_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w1, "fc1.weight"), numpy_helper.from_array(w2, "fc2.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

"""int4 test models: small float graphs quantized by onnxruntime's ``MatMulNBitsQuantizer``.

Every constant-weight MatMul becomes a com.microsoft ``MatMulNBits`` (codes packed two a byte,
one scale per block of ``block_size`` input rows, packed zero points unless symmetric).

* ``mlp(act, hidden)``: ``x -> MatMul + b -> act -> MatMul``; a ``hidden`` that is not a multiple
  of the block size leaves the second layer a partial last block.
* ``swiglu()``: Llama's gated MLP, ``down(silu(gate(x)) * up(x))`` (SiLU as ``x * Sigmoid(x)``).
* ``llama(...)``: tests/llama_models.py's LlamaLike exported by TorchScript, every projection and
  the LM head quantized.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIM = 32


def quantize(model: onnx.ModelProto, block_size: int, symmetric: bool,
             bits: int = 4) -> onnx.ModelProto:
    """``model`` with every constant-weight MatMul as MatMulNBits (onnxruntime's quantizer)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric)
    quantizer.process()
    return quantizer.model.model


def _weight(rng, rows: int, cols: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (rng.standard_normal((rows, cols)) * rows ** -0.5).astype(np.float32), name)


def _model(nodes: list, inits: list, dim: int, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def mlp(act: str = "Relu", hidden: int = 64, dim: int = DIM, seed: int = 0) -> onnx.ModelProto:
    """``x -> MatMul(up) + b -> act -> MatMul(down)`` in float."""
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, dim, hidden, "up_w"), _weight(rng, hidden, dim, "down_w"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "up_b")]
    nodes = [helper.make_node("MatMul", ["x", "up_w"], ["h"], name="up"),
             helper.make_node("Add", ["h", "up_b"], ["hb"], name="up_bias"),
             helper.make_node(act, ["hb"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "down_w"], ["y"], name="down")]
    return _model(nodes, inits, dim, "mlp")


def swiglu(hidden: int = 64, dim: int = DIM, seed: int = 0) -> onnx.ModelProto:
    """Llama's MLP ``down(silu(gate(x)) * up(x))`` in float."""
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, dim, hidden, "gate_w"), _weight(rng, dim, hidden, "up_w"),
             _weight(rng, hidden, dim, "down_w")]
    nodes = [helper.make_node("MatMul", ["x", "gate_w"], ["g"], name="gate"),
             helper.make_node("Sigmoid", ["g"], ["gs"], name="sigmoid"),
             helper.make_node("Mul", ["g", "gs"], ["silu"], name="silu"),
             helper.make_node("MatMul", ["x", "up_w"], ["u"], name="up"),
             helper.make_node("Mul", ["silu", "u"], ["gu"], name="gated"),
             helper.make_node("MatMul", ["gu", "down_w"], ["y"], name="down")]
    return _model(nodes, inits, dim, "swiglu")


def llama(**kwargs) -> onnx.ModelProto:
    """tests/llama_models.py's LlamaLike (TorchScript export), in float."""
    from tests.llama_models import build_llama_like, export_llama

    return export_llama(build_llama_like(**kwargs), dynamo=False)

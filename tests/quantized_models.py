"""Quantized test models: onnxruntime's ``quantize_static`` output and hand-built QDQ forms.

``static(name, fmt, per_channel)`` exports a zoo model (tests/torch_models.py) with TorchScript
(BN folded, as quantization tools expect) and quantizes it with onnxruntime over a few seeded
random batches (calibration stays fast). The hand-built forms cover what ``quantize_static`` does
not write: per-channel activation quantization, blocked (opset 21) weights, and fake-quantized
float weights (``DequantizeLinear(QuantizeLinear(W))``, as TensorRT explicit-quantization exports).
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.torch_models import ZOO, export_built

#: Zoo models quantized in the tests and the benchmark.
STATIC_MODELS = ("resnet18_like", "mobilenetv2_like")


class _RandomBatches:
    """onnxruntime's CalibrationDataReader over a few seeded random batches."""

    def __init__(self, name: str, shape: tuple[int, ...], batches: int = 4) -> None:
        rng = np.random.default_rng(0)
        self._feeds = iter([{name: rng.standard_normal(shape).astype(np.float32)}
                            for _ in range(batches)])

    def get_next(self):
        return next(self._feeds, None)


@lru_cache(maxsize=None)
def _static_bytes(name: str, fmt: str, per_channel: bool) -> bytes:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = export_built(ZOO[name], dynamo=False, fold_bn=True)
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(source))
        quantize_static(str(source), str(target), _RandomBatches(model.graph.input[0].name, shape),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return target.read_bytes()


def static(name: str, fmt: str = "qdq", per_channel: bool = True) -> onnx.ModelProto:
    """A zoo model quantized by ``quantize_static`` (``fmt``: "qdq" or "qoperator")."""
    return onnx.load_from_string(_static_bytes(name, fmt, per_channel))


# --- hand-built forms -------------------------------------------------------------------------

def _const(inits: list, name: str, value: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def hand_built(form: str) -> onnx.ModelProto:
    """conv1 -> relu -> Q/DQ -> conv2 -> Q/DQ -> conv3 (output), weights behind DequantizeLinear.

    Forms: ``per_channel_activations`` (activation Q/DQ per channel on axis 1),
    ``blocked_weights`` (conv2's weight quantized in blocks of 4 input channels, opset 21),
    ``fake_quant_weights`` (float weights through QuantizeLinear -> DequantizeLinear),
    ``quantized_bias`` (int32 biases, scale = x_scale * w_scale per channel).
    """
    rng = np.random.default_rng(3)
    opset = 21 if form == "blocked_weights" else 13
    nodes, inits = [], []
    chans = [3, 16, 16, 4]

    def act_qdq(name: str, x: str, c: int) -> str:
        if form == "per_channel_activations":
            s = _const(inits, f"{name}.scale", rng.uniform(0.02, 0.08, c).astype(np.float32))
            z = _const(inits, f"{name}.zp", rng.integers(100, 156, c).astype(np.uint8))
            attrs = {"axis": 1}
        else:
            s = _const(inits, f"{name}.scale", np.float32(0.05))
            z = _const(inits, f"{name}.zp", np.uint8(128))
            attrs = {}
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"],
                                      name=f"{name}_q", **attrs))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"],
                                      name=f"{name}_dq", **attrs))
        return f"{name}_dq"

    def weight(name: str, cout: int, cin: int) -> tuple[str, np.ndarray]:
        w_scale = rng.uniform(0.002, 0.01, cout).astype(np.float32)
        q = rng.integers(-100, 100, [cout, cin, 3, 3]).astype(np.int8)
        if form == "fake_quant_weights":
            w = _const(inits, f"{name}.weight", (q.astype(np.float32) *
                                                   w_scale[:, None, None, None]))
            s = _const(inits, f"{name}.w_scale", w_scale)
            z = _const(inits, f"{name}.w_zp", np.zeros(cout, np.int8))
            nodes.append(helper.make_node("QuantizeLinear", [w, s, z], [f"{name}_wq"],
                                          name=f"{name}_wq", axis=0))
            q_name = f"{name}_wq"
        elif form == "blocked_weights" and name == "conv2":
            blocks = cin // 4
            b_scale = rng.uniform(0.002, 0.01, (cout, blocks, 3, 3)).astype(np.float32)
            q_name = _const(inits, f"{name}.weight_q", q)
            s = _const(inits, f"{name}.w_scale", b_scale)
            z = _const(inits, f"{name}.w_zp", np.zeros(b_scale.shape, np.int8))
            nodes.append(helper.make_node("DequantizeLinear", [q_name, s, z], [f"{name}_w"],
                                          name=f"{name}_wdq", axis=1, block_size=4))
            return f"{name}_w", w_scale
        else:
            q_name = _const(inits, f"{name}.weight_q", q)
            s = _const(inits, f"{name}.w_scale", w_scale)
            z = _const(inits, f"{name}.w_zp", np.zeros(cout, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [q_name, s, z], [f"{name}_w"],
                                      name=f"{name}_wdq", axis=0))
        return f"{name}_w", w_scale

    def bias(name: str, cout: int, w_scale: np.ndarray, x_scale: float) -> str:
        if form != "quantized_bias":
            return _const(inits, f"{name}.bias", rng.normal(0, 0.1, cout).astype(np.float32))
        scale = (w_scale * np.float32(x_scale)).astype(np.float32)
        q = _const(inits, f"{name}.bias_q", rng.integers(-500, 500, cout).astype(np.int32))
        s = _const(inits, f"{name}.bias_scale", scale)
        z = _const(inits, f"{name}.bias_zp", np.zeros(cout, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [f"{name}_b"],
                                      name=f"{name}_bdq", axis=0))
        return f"{name}_b"

    x = act_qdq("in", "input", 3)
    for k, name in enumerate(("conv1", "conv2", "conv3")):
        w, w_scale = weight(name, chans[k + 1], chans[k])
        b = bias(name, chans[k + 1], w_scale, 0.05)
        out = "output" if name == "conv3" else f"{name}_out"
        nodes.append(helper.make_node("Conv", [x, w, b], [out], name=name, pads=[1, 1, 1, 1]))
        if name != "conv3":
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            x = act_qdq(f"{name}_act", f"{name}_relu", chans[k + 1])
    graph = helper.make_graph(
        nodes, form, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset == 21 else 8
    return model


HAND_BUILT = ("per_channel_activations", "blocked_weights", "fake_quant_weights",
              "quantized_bias")

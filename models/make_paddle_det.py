"""Write a PP-OCR-style text detector in the form paddle2onnx ships it (random seeded weights).

The form of ``ch_PP-OCRv4_det_infer.onnx`` (rapidocr-onnxruntime), not its weights: input ``x``
``[p2o.DynamicDimension.0, 3, p2o.DynamicDimension.1, p2o.DynamicDimension.2]``; every weight
in a ``Constant`` node; opset 12, IR 8; an LCNet-like backbone (stride 32) of depthwise and
pointwise convs with hard_swish written as ``x * Clip(x + 3, 0, 6) / 6`` and a learnable affine
(scalar ``Mul`` + ``Add``) after it, squeeze-excite blocks (GlobalAveragePool, 1x1 convs,
HardSigmoid, Mul); an FPN neck (1x1 laterals, ``Resize`` by scales 2 top-down and Add, 3x3
smoothing, Resize to stride 4, Concat); a DB head (conv-BN-ReLU, two ConvTranspose, Sigmoid).
About 700 nodes, like the real one (672). onnx.helper only: no torch, no paddle.

    python models/make_paddle_det.py [out.onnx]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIMS = ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2"]
#: (depthwise kernel, stride, output width, squeeze-excite) per block, after a stride-2 stem.
BLOCKS = ((3, 1, 32, False), (3, 2, 64, False), (3, 1, 64, False), (3, 2, 128, False),
          (3, 1, 128, False), (3, 2, 256, False), (5, 1, 256, False), (5, 1, 256, False),
          (5, 1, 256, False), (5, 1, 256, False), (5, 1, 256, True), (5, 2, 512, True),
          (5, 1, 512, True))


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"p2o.{kind}.{self.count}"

    def const(self, value: np.ndarray) -> str:
        out = self.name("helper.constant")
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"{out}_node",
                                           value=numpy_helper.from_array(value, out)))
        return out

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        node = self.name(op_type)
        out = f"{node}.tmp_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * (2 / fan_in) ** 0.5)
        inputs = [x, self.const(w.astype(np.float32))]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4, group=group)

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def hardswish_lab(self, x: str) -> str:
        clipped = self.op("Clip", [self.op("Add", [x, self.scalar(3.0)]), self.scalar(0.0),
                                   self.scalar(6.0)])
        y = self.op("Div", [self.op("Mul", [x, clipped]), self.scalar(6.0)])
        scale = self.scalar(float(self.rng.uniform(0.8, 1.2)))
        return self.op("Add", [self.op("Mul", [y, scale]),
                               self.scalar(float(self.rng.normal(0, 0.05)))])

    def bn(self, x: str, c: int) -> str:
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.1, c),
                  self.rng.normal(0, 0.1, c), self.rng.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization",
                       [x, *(self.const(p.astype(np.float32)) for p in params)], epsilon=1e-5)

    def se(self, x: str, c: int) -> str:
        s = self.op("GlobalAveragePool", [x])
        s = self.op("Relu", [self.conv(s, c, c // 4, 1)])
        s = self.op("HardSigmoid", [self.conv(s, c // 4, c, 1)], alpha=0.2, beta=0.5)
        return self.op("Mul", [x, s])

    def resize(self, x: str, factor: int) -> str:
        roi = self.const(np.zeros(0, np.float32))
        scales = self.const(np.array([1, 1, factor, factor], np.float32))
        return self.op("Resize", [x, roi, scales], mode="nearest")


def build(seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.hardswish_lab(b.conv("x", 3, 16, 3, stride=2))
    cin, stride, levels = 16, 2, {}
    for k, s, cout, se in BLOCKS:
        x = b.hardswish_lab(b.conv(x, cin, cin, k, stride=s, group=cin))
        if se:
            x = b.se(x, cin)
        x = b.hardswish_lab(b.conv(x, cin, cout, 1))
        cin, stride = cout, stride * s
        levels[stride] = (x, cout)
    top, outs = None, []
    for level in (32, 16, 8, 4):
        feature, width = levels[level]
        lateral = b.conv(feature, width, 96, 1, bias=False)
        if top is not None:
            lateral = b.op("Add", [lateral, b.resize(top, 2)])
        top = lateral
        smooth = b.conv(lateral, 96, 24, 3, bias=False)
        outs.append(b.resize(smooth, level // 4) if level > 4 else smooth)
    fused = b.op("Concat", outs, axis=1)
    h = b.op("Relu", [b.bn(b.conv(fused, 96, 24, 3, bias=False), 24)])
    up = b.op("ConvTranspose", [h, b.const((b.rng.standard_normal((24, 24, 2, 2)) * 0.2)
                                           .astype(np.float32))], strides=[2, 2])
    h = b.op("Relu", [b.bn(up, 24)])
    up = b.op("ConvTranspose", [h, b.const((b.rng.standard_normal((24, 1, 2, 2)) * 0.2)
                                           .astype(np.float32))], strides=[2, 2])
    b.nodes.append(helper.make_node("Sigmoid", [up], ["sigmoid_0.tmp_0"], name="p2o.Sigmoid.0"))
    graph = helper.make_graph(
        b.nodes, "paddle_det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, DIMS)],
        [helper.make_tensor_value_info("sigmoid_0.tmp_0", TensorProto.FLOAT,
                                       ["p2o.DynamicDimension.3", 1, "p2o.DynamicDimension.4",
                                        "p2o.DynamicDimension.5"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)],
                              producer_name="PaddlePaddle")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / \
        "paddle_det_generated.onnx"
    model = build()
    onnx.save(model, str(out))
    print(f"wrote {out} ({len(model.graph.node)} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

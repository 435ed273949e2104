"""Forms of models as they are shipped (issue 9), built by hand where no exporter is at hand.

Each builder returns a small model in the form a real exporter writes; the tests prune it with
no option but the sparsity (``tests/test_shipped_forms.py``).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import helper

from tests.onnx_patterns import _Net

# --- dynamic input dims: sizes chosen by the tool (issue 9, items 1-3) -------------------------

#: How PaddlePaddle (paddle2onnx) writes the dims of a detector input, as shipped.
PADDLE_DIMS = {
    "named": ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2"],
    "question_mark": ["p2o.DynamicDimension.0", 3, "?", "?"],
    "minus_one": [-1, 3, "?", "?"],
}


def _hardswish(n: _Net, name: str, x: str) -> str:
    """Paddle writes hard_swish as x * Clip(x + 3, 0, 6) / 6 (with Constant bounds)."""
    three, zero, six = (n.const(f"{name}.{k}", np.float32(v), as_node=True)
                        for k, v in (("three", 3), ("zero", 0), ("six", 6)))
    clipped = n.op("Clip", f"{name}_clip", [n.op("Add", f"{name}_add", [x, three]), zero, six])
    return n.op("Div", f"{name}_div", [n.op("Mul", f"{name}_mul", [x, clipped]), six])


def paddle_detector(dims: str = "named") -> onnx.ModelProto:
    """PP-OCR-style DB detector: Constant weights, stride-32 backbone, Resize FPN neck.

    Input ``x`` with dims as in ``PADDLE_DIMS[dims]``; four stages (strides 4, 8, 16, 32) of
    conv-bn-hardswish; FPN: 1x1 lateral convs, the deeper level upsampled by Resize (scales
    [1, 1, 2, 2], as paddle2onnx writes nearest ``interpolate``) and added; the sum of the four
    levels upsampled to stride 4, then a head conv -> Sigmoid (output frozen). Opset 12, IR 7.
    """
    n = _Net(91, constants=True)
    widths, x, levels = (8, 16, 24, 32), "x", []
    cin = 3
    for i, width in enumerate(widths):
        stride = 4 if i == 0 else 2
        x = n.conv(f"stage{i}.conv", x, cin, width, k=3 if i else 5, stride=stride)
        x = _hardswish(n, f"stage{i}.act", n.bn(f"stage{i}.bn", x, width))
        levels.append((x, width))
        cin = width
    roi = n.const("resize.roi", np.zeros(0, np.float32), as_node=True)
    up2 = n.const("resize.scales2", np.array([1, 1, 2, 2], np.float32), as_node=True)
    top = None
    merged = []
    for i in reversed(range(4)):
        lateral = n.conv(f"neck.lateral{i}", levels[i][0], levels[i][1], 16, k=1, bias=False)
        if top is not None:
            upsampled = n.op("Resize", f"neck.up{i}", [top, roi, up2], mode="nearest")
            lateral = n.op("Add", f"neck.add{i}", [lateral, upsampled])
        top = lateral
        merged.append((i, n.conv(f"neck.smooth{i}", lateral, 16, 8, bias=False)))
    fused = None
    for i, feature in merged:
        if i:
            scales = n.const(f"neck.scales{i}", np.array([1, 1, 2**i, 2**i], np.float32),
                             as_node=True)
            feature = n.op("Resize", f"neck.fuse_up{i}", [feature, roi, scales], mode="nearest")
        fused = feature if fused is None else n.op("Add", f"neck.fuse{i}", [fused, feature])
    h = n.relu("head.relu", n.bn("head.bn", n.conv("head.conv", fused, 8, 8), 8))
    logits = n.conv("head.out", h, 8, 1, k=1)
    n.op("Sigmoid", "head.sigmoid", [logits], out="sigmoid_0.tmp_0")
    out_dims = [d if d == -1 else "p2o.DynamicDimension.3" if k == 0 else 1 if k == 1 else "?"
                for k, d in enumerate(PADDLE_DIMS[dims])]
    model = n.model({"sigmoid_0.tmp_0": out_dims}, {"x": PADDLE_DIMS[dims]}, opset=12)
    model.ir_version = 7
    model.producer_name = "PaddlePaddle"
    return model


def dynamic_axes_detector() -> onnx.ModelProto:
    """Detector exported with dynamic axes ``batch``/``height``/``width`` (initializers, opset
    17): a stride-32 backbone of conv-bn-relu stages, a Resize (``scales``) + Concat neck, and
    two heads (a box map and a class map) as graph outputs."""
    n = _Net(92)
    x, cin, levels = "images", 3, []
    for i, width in enumerate((8, 16, 16, 24, 32)):
        x = n.relu(f"backbone{i}.relu", n.bn(f"backbone{i}.bn",
                                             n.conv(f"backbone{i}.conv", x, cin, width,
                                                    stride=2), width))
        levels.append((x, width))
        cin = width
    deep, mid = levels[4], levels[3]
    up = n.op("Resize", "neck.up", [deep[0], "", n.const("neck.scales", np.array(
        [1, 1, 2, 2], np.float32))], mode="nearest")
    cat = n.op("Concat", "neck.concat", [up, mid[0]], axis=1)
    y = n.relu("neck.relu", n.conv("neck.conv", cat, deep[1] + mid[1], 16))
    n.conv("head.box", y, 16, 4, k=1, out="boxes")
    n.conv("head.cls", y, 16, 3, k=1, out="scores")
    out = ["batch", 4, "floor(height/16)", "floor(width/16)"]
    return n.model({"boxes": out, "scores": ["batch", 3, *out[2:]]},
                   {"images": ["batch", 3, "height", "width"]})


def nhwc_all_symbolic() -> onnx.ModelProto:
    """tf2onnx classifier with every non-channel dim symbolic: ``[N, M1, M2, 3]`` ->
    Transpose to NCHW -> convs -> GlobalAveragePool -> Flatten -> MatMul + Add (Dense)."""
    n = _Net(93)
    x = n.op("Transpose", "to_nchw", ["input_1"], perm=[0, 3, 1, 2])
    x = n.relu("conv1.relu", n.conv("conv1", x, 3, 8, stride=2))
    x = n.relu("conv2.relu", n.conv("conv2", x, 8, 16, stride=2))
    x = n.op("Flatten", "flatten", [n.op("GlobalAveragePool", "gap", [x])], axis=1)
    n.matmul_add("dense", x, 16, 10, out="logits")
    return n.model({"logits": ["N", 10]}, {"input_1": ["N", "M1", "M2", 3]}, opset=13)


def token_classifier() -> onnx.ModelProto:
    """Text model with int64 token ids ``[batch, sequence]``: embedding Gather -> MLP
    (MatMul + Add, Relu, MatMul + Add) -> mean over the sequence."""
    n = _Net(95)
    embedded = n.op("Gather", "embed", [n.randn("embed.weight", [50, 16], 0.5), "input_ids"],
                    axis=0)
    x = n.relu("fc1.relu", n.matmul_add("fc1", embedded, 16, 32))
    x = n.matmul_add("fc2", x, 32, 8)
    n.op("ReduceMean", "pool", [x], out="pooled", axes=[1], keepdims=0)
    model = n.model({"pooled": ["batch", 8]}, {"input_ids": ["batch", "sequence"]})
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    return model


def torch_dynamic_axes(dynamo: bool) -> onnx.ModelProto:
    """A small FPN detector in torch, exported with dynamic batch/height/width by either
    exporter (TorchScript ``dynamic_axes``; torch.export ``dynamic_shapes``)."""
    import torch
    from torch import nn
    from torch.nn import functional

    from tests.torch_models import _quiet_exporter

    class Det(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.l1, self.l2 = nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1)
            self.mid = nn.Sequential(nn.Conv2d(8, 12, 3, 1, 1), nn.ReLU())
            self.head = nn.Conv2d(12, 1, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.c1(x)
            b = self.c2(a)
            p = self.l1(a) + functional.interpolate(self.l2(b), scale_factor=2.0)
            return torch.sigmoid(self.head(self.mid(torch.relu(p))))

    torch.manual_seed(0)
    module = Det().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (module.c1[1], module.c2[1]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    example = (torch.zeros(1, 3, 64, 64),)
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        path = os.path.join(tmp, "model.onnx")
        if dynamo:
            from torch.export import Dim

            torch.onnx.export(module, example, path, dynamo=True, opset_version=18,
                              input_names=["input"], output_names=["output"],
                              dynamic_shapes={"x": {0: Dim("batch"), 2: Dim.AUTO,
                                                    3: Dim.AUTO}},
                              external_data=False, verbose=False)
        else:
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(module, example, path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": axes, "output": axes})
        return onnx.load(path)


def size_baked(model: onnx.ModelProto, sizes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """``model`` with each computed Reshape target and Resize ``sizes`` replaced by its value at
    ``sizes``: what a rewrite that folded a Shape-derived value at one size would write."""
    from onnx_fpgm.validate import make_session, random_inputs

    stored = {t.name for t in model.graph.initializer}
    stored |= {o for node in model.graph.node if node.op_type == "Constant" for o in node.output}
    params = {("Reshape", 1), ("Resize", 3)}
    targets = [node.input[k] for node in model.graph.node for op, k in params
               if node.op_type == op and len(node.input) > k and node.input[k]
               and node.input[k] not in stored]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in targets)
    values = make_session(exposed).run(targets, random_inputs(model, 0, sizes))
    baked = onnx.ModelProto()
    baked.CopyFrom(model)
    for name, value in zip(targets, values):
        baked.graph.initializer.append(onnx.numpy_helper.from_array(
            np.asarray(value, dtype=np.int64), f"{name}_baked"))
        for node in baked.graph.node:
            node.input[:] = [f"{name}_baked" if i == name and node.op_type != "Shape" else i
                             for i in node.input]
    return baked


def computed_shapes() -> onnx.ModelProto:
    """``[batch, 3, H, W]`` -> conv -> Resize to ``sizes`` = Shape * [1, 1, 2, 2] -> conv ->
    Reshape(x, Concat(Shape(x)[0:2], [-1])) -> mean over positions -> Dense. Both shape
    parameters are computed from the input's size, as exporters write them."""
    n = _Net(94)
    x = n.relu("conv1.relu", n.conv("conv1", "input", 3, 8))
    twice = n.op("Mul", "twice", [n.op("Shape", "shape1", [x]), n.ints("factors", [1, 1, 2, 2])])
    x = n.op("Resize", "up", [x, "", "", twice], mode="nearest")
    x = n.relu("conv2.relu", n.conv("conv2", x, 8, 8))
    head = n.op("Slice", "slice", [n.op("Shape", "shape2", [x]), n.ints("s0", [0]),
                                    n.ints("s2", [2])])
    target = n.op("Concat", "target", [head, n.ints("minus1", [-1])], axis=0)
    pooled = n.op("ReduceMean", "pool", [n.op("Reshape", "flat", [x, target])], axes=[2],
                  keepdims=0)
    n.matmul_add("fc", pooled, 8, 5, out="output")
    return n.model({"output": ["batch", 5]}, {"input": ["batch", 3, "H", "W"]})

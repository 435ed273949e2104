"""Forms of models as they are shipped (issue 9), built by hand where no exporter is at hand.

Written the way that exporter writes them (tf2onnx, paddle2onnx, torch, onnxruntime: node order,
dtypes, symbolic dims), so the engine is tested on those forms rather than on our own choices.

Each builder returns a small model in the form a real exporter writes; the tests prune it with
no option but the sparsity (``tests/test_shipped_forms.py``).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper

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


def torch_waveform_vad(dynamo: bool) -> onnx.ModelProto:
    """A voice-activity model on raw audio ``[batch, samples]`` (silero VAD's form): reflect
    Pad + a 320-tap strided Conv1d as the STFT, a Conv1d encoder, an LSTM over the frames and a
    Linear -> Sigmoid per frame; it runs from 192 samples up only."""
    import torch
    from torch import nn
    from torch.nn import functional

    from tests.torch_models import _quiet_exporter

    class Vad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stft = nn.Conv1d(1, 32, 320, stride=128, bias=False)
            self.encoder = nn.Sequential(nn.Conv1d(32, 16, 3, padding=1), nn.ReLU(),
                                         nn.Conv1d(16, 16, 3, padding=1), nn.ReLU())
            self.rnn = nn.LSTM(16, 8)
            self.out = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = functional.pad(x.unsqueeze(1), (64, 64), mode="reflect")
            x = self.encoder(torch.relu(self.stft(x)))
            y, _ = self.rnn(x.permute(2, 0, 1))
            return torch.sigmoid(self.out(y))

    torch.manual_seed(0)
    module = Vad().eval()
    # torch.export specialises a batch of 1 (the LSTM's zero state); TorchScript warns on others
    example = (torch.zeros(3 if dynamo else 1, 512),)
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        path = os.path.join(tmp, "model.onnx")
        if dynamo:
            from torch.export import Dim

            torch.onnx.export(module, example, path, dynamo=True, opset_version=18,
                              input_names=["input"], output_names=["output"],
                              dynamic_shapes={"x": {0: Dim("batch"), 1: Dim.AUTO}},
                              external_data=False, verbose=False)
        else:
            torch.onnx.export(module, example, path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch", 1: "samples"},
                                            "output": {0: "frames", 1: "batch"}})
        return onnx.load(path)


#: Every form above with symbolic input dims, by name (tests and benchmarks/zoo.py).
DYNAMIC_DIM_FORMS = {
    **{f"paddle_{k}": (lambda k=k: paddle_detector(k))
       for k in PADDLE_DIMS},
    "dynamic_axes_detector": dynamic_axes_detector,
    "nhwc_all_symbolic": nhwc_all_symbolic,
    "token_classifier": token_classifier,
    "torch_dynamic_axes_torchscript": lambda: torch_dynamic_axes(dynamo=False),
    "torch_dynamic_axes_dynamo": lambda: torch_dynamic_axes(dynamo=True),
    "torch_waveform_vad_torchscript": lambda: torch_waveform_vad(dynamo=False),
    "torch_waveform_vad_dynamo": lambda: torch_waveform_vad(dynamo=True),
}


def size_baked(model: onnx.ModelProto, sizes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """``model`` with each computed Reshape target and Resize ``sizes`` replaced by its value at
    ``sizes``: what a rewrite that folded a Shape-derived value at one size would write."""
    from onnx_fpgm.model.runtime import make_session, random_inputs

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


# --- computed shape parameters (issue 9, item 4) ----------------------------------------------


def tf2onnx_computed_flatten(*, shared_constant: bool = False) -> onnx.ModelProto:
    """A Keras CNN through tf2onnx: NHWC input ``[unk__99, 16, 16, 3]``, Flatten computed.

    Input -> Transpose(NCHW) -> conv1 -> BN as Mul/Add ([C,1,1] constants) -> Relu -> conv2 ->
    Relu -> MaxPool -> conv3 -> Relu -> Transpose(NHWC) -> Reshape(x, Cast(Concat(Slice(Cast(
    Gather(Shape(conv3 output), perm)), 0:1), [256]))) -> MatMul+Add -> Relu -> MatMul+Add.
    tf2onnx's transpose optimiser rewrites ``Shape(Transpose(y))`` as ``Gather(Shape(y), perm)``;
    TF shapes are int32, hence the Casts. With ``shared_constant``, the ``[256]`` constant is
    also read by a second, unrelated Concat (a side output), so it must be copied, not edited.
    """
    n = _Net(99)
    x = n.op("Transpose", "StatefulPartitionedCall/model/conv1/Conv2D__6", ["input_1"],
             perm=[0, 3, 1, 2])
    x = n.conv("StatefulPartitionedCall/model/conv1/Conv2D", x, 3, 8)
    scale = n.const("bn1/mul_const", n.rng.uniform(0.5, 1.5, [8, 1, 1]).astype(np.float32))
    x = n.op("Mul", "StatefulPartitionedCall/model/bn1/FusedBatchNormV3/mul", [x, scale])
    x = n.op("Add", "StatefulPartitionedCall/model/bn1/FusedBatchNormV3/add",
             [x, n.randn("bn1/add_const", [8, 1, 1], 0.1)])
    x = n.relu("StatefulPartitionedCall/model/relu1/Relu", x)
    x = n.relu("StatefulPartitionedCall/model/relu2/Relu",
               n.conv("StatefulPartitionedCall/model/conv2/Conv2D", x, 8, 16))
    x = n.op("MaxPool", "StatefulPartitionedCall/model/pool/MaxPool", [x], kernel_shape=[4, 4],
             strides=[4, 4])
    conv3 = n.relu("StatefulPartitionedCall/model/relu3/Relu",
                   n.conv("StatefulPartitionedCall/model/conv3/Conv2D", x, 16, 16))
    nhwc = n.op("Transpose", "StatefulPartitionedCall/model/relu3/Relu__20", [conv3],
                perm=[0, 2, 3, 1])
    shape = n.op("Shape", "StatefulPartitionedCall/model/flatten/Shape", [conv3])
    shape = n.op("Gather", "StatefulPartitionedCall/model/flatten/Shape__22",
                 [shape, n.ints("const_axes__perm", [0, 2, 3, 1])], axis=0)
    shape = n.op("Cast", "StatefulPartitionedCall/model/flatten/Shape__23", [shape],
                 to=TensorProto.INT32)
    batch = n.op("Slice", "StatefulPartitionedCall/model/flatten/strided_slice",
                 [shape, n.ints("const_starts__10", [0]), n.ints("const_ends__11", [1]),
                  n.ints("const_axes__12", [0])])
    features = n.const("const_fold_opt__30", np.array([256], np.int32))
    target = n.op("Concat", "StatefulPartitionedCall/model/flatten/Reshape/shape_Concat__26",
                  [batch, features], axis=0)
    target = n.op("Cast", "StatefulPartitionedCall/model/flatten/Reshape__27", [target],
                  to=TensorProto.INT64)
    x = n.op("Reshape", "StatefulPartitionedCall/model/flatten/Reshape", [nhwc, target])
    x = n.relu("StatefulPartitionedCall/model/dense/Relu",
               n.matmul_add("StatefulPartitionedCall/model/dense/MatMul", x, 256, 32))
    n.matmul_add("StatefulPartitionedCall/model/dense_1/MatMul", x, 32, 10, out="dense_1")
    outputs: dict[str, list] = {"dense_1": ["unk__99", 10]}
    if shared_constant:
        n.op("Concat", "side_concat", [n.ints("side_part", [7]),
                                       n.op("Cast", "side_cast", [features], to=TensorProto.INT64)],
             axis=0, out="side")
        outputs["side"] = [2]
    model = n.model(outputs, {"input_1": ["unk__99", 16, 16, 3]}, opset=13)
    model.producer_name, model.producer_version = "tf2onnx", "1.16.1 15c810"
    model.graph.output[-1].type.tensor_type.elem_type = TensorProto.INT64 if shared_constant \
        else TensorProto.FLOAT
    return model


def paddle_reshape_zero_minus_one() -> onnx.ModelProto:
    """paddle2onnx: input ``[-1, 3, 8, 8]`` (a ``?`` batch), weights in Constant nodes,
    ``reshape(x, [0, -1])`` then ``matmul`` + ``elementwise_add``."""
    n = _Net(7, constants=True)
    x = n.relu("relu_0.tmp_0", n.bn("batch_norm_0.tmp_2", n.conv("conv2d_0.tmp_0", "x", 3, 8), 8))
    x = n.relu("relu_1.tmp_0", n.conv("conv2d_1.tmp_0", x, 8, 8, stride=2))
    x = n.op("Reshape", "reshape2_0.tmp_0", [x, n.ints("reshape2_0.shape", [0, -1])])
    n.matmul_add("linear_0.tmp_0", x, 8 * 4 * 4, 10, out="linear_1.tmp_1")
    model = n.model({"linear_1.tmp_1": ["?", 10]}, {"x": ["?", 3, 8, 8]}, opset=11)
    model.producer_name = "PaddlePaddle"
    return model


def resize_computed_sizes() -> onnx.ModelProto:
    """An FPN-style neck with a dynamic batch: ``Resize(x, sizes=Concat(Shape(x)[0:2],
    Shape(lateral)[2:4]))``; the channel entry is the input's own channel count."""
    n = _Net(31)
    c1 = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    c2 = n.relu("relu2", n.conv("conv2", c1, 8, 8, stride=2))
    top = n.relu("relu_top", n.conv("conv_top", c2, 8, 8, k=1))
    head = n.op("Shape", "shape_top", [top])
    head = n.op("Slice", "slice_top", [head, n.ints("s0", [0]), n.ints("e2", [2]),
                                       n.ints("ax0", [0])])
    tail = n.op("Shape", "shape_lat", [c1])
    tail = n.op("Slice", "slice_lat", [tail, n.ints("s2", [2]), n.ints("e4", [4]),
                                       n.ints("ax0b", [0])])
    sizes = n.op("Concat", "sizes", [head, tail], axis=0)
    up = n.op("Resize", "resize", [top, "", "", sizes], mode="nearest")
    lateral = n.relu("relu_lat", n.conv("conv_lat", c1, 8, 8, k=1))
    n.head(n.op("Add", "fuse", [up, lateral]), 8)
    return n.model({"output": ["N", 4, 8, 8]}, {"input": ["N", 3, 8, 8]}, opset=13)


def resize_computed_channel_sizes() -> onnx.ModelProto:
    """Resize whose sizes take the channel count of *another* tensor: must be blocked."""
    n = _Net(32)
    c1 = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    other = n.relu("relu2", n.conv("conv2", c1, 8, 8))
    sizes = n.op("Concat", "sizes", [
        n.op("Slice", "slice_other", [n.op("Shape", "shape_other", [other]), n.ints("s0", [0]),
                                      n.ints("e2", [2]), n.ints("ax0", [0])]),
        n.ints("hw", [16, 16])], axis=0)
    up = n.op("Resize", "resize", [c1, "", "", sizes], mode="nearest")
    n.head(n.op("Add", "fuse", [n.op("MaxPool", "pool", [up], kernel_shape=[2, 2],
                                     strides=[2, 2]), other]), 8)
    return n.model({"output": ["N", 4, 8, 8]}, {"input": ["N", 3, 8, 8]}, opset=13)


def slice_bounds_partly_computed() -> onnx.ModelProto:
    """A U-Net style crop with a dynamic batch: ``x[:, 2:6, :h]`` with ``h`` read from a skip
    tensor's shape (``Slice(x, [2, 0], Concat([6], Shape(skip)[2:3]), [1, 2])``)."""
    n = _Net(33)
    c1 = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    skip = n.op("MaxPool", "pool", [c1], kernel_shape=[2, 1], strides=[2, 1])
    h = n.op("Slice", "skip_h", [n.op("Shape", "skip_shape", [skip]), n.ints("s2", [2]),
                                 n.ints("e3", [3]), n.ints("a0", [0])])
    ends = n.op("Concat", "crop_ends", [n.ints("c_end", [6]), h], axis=0)
    crop = n.op("Slice", "crop", [c1, n.ints("crop_starts", [2, 0]), ends,
                                  n.ints("crop_axes", [1, 2])])
    x = n.relu("relu2", n.conv("conv2", crop, 4, 8))
    n.head(n.op("Add", "fuse", [x, n.conv("conv_skip", skip, 8, 8, k=1)]), 8)
    return n.model({"output": ["N", 4, 4, 8]}, {"input": ["N", 3, 8, 8]}, opset=13)


def _torch_view_net():
    import torch

    class ViewNet(torch.nn.Module):
        """conv-bn-relu, conv-relu, then ``x.view(x.size(0), -1)`` or ``torch.flatten``."""

        def __init__(self, form: str) -> None:
            super().__init__()
            self.form = form
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.se = torch.nn.Linear(8, 8)
            self.chunk_conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc1 = torch.nn.Linear(8 * 4 * 4, 16)
            self.fc2 = torch.nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            if self.form == "view":
                x = x.view(x.size(0), -1)
            elif self.form == "se":  # squeeze-excitation, sizes read with x.size()
                b, c, _, _ = x.size()
                y = torch.nn.functional.adaptive_avg_pool2d(x, 1).view(b, c)
                y = torch.sigmoid(self.se(y)).view(b, c, 1, 1)
                x = (x * y).view(b, -1)
            elif self.form == "chunk":  # TorchScript: Slice bounds computed from Shape
                p, q = torch.chunk(x, 2, dim=1)
                x = torch.cat([torch.relu(self.chunk_conv(p)), q], 1)
                x = x.view(x.size(0), -1)
            elif self.form == "reshape":
                x = x.reshape(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3])
            else:
                x = torch.flatten(x, 1)
            return self.fc2(torch.relu(self.fc1(x)))

    return ViewNet


def torch_view_batch(form: str, dynamo: bool) -> onnx.ModelProto:
    """A torch CNN exported with a dynamic batch; the head flattens with ``form``:
    ``view`` (``x.view(x.size(0), -1)``), ``reshape`` (all sizes read from ``x.shape``),
    ``flatten`` (``torch.flatten(x, 1)``), ``se`` (a squeeze-excitation block sized with
    ``b, c, _, _ = x.size()``) or ``chunk`` (``torch.chunk`` on channels, then ``view``)."""
    import io

    import torch

    torch.manual_seed(0)
    module = _torch_view_net()(form).eval()
    with torch.no_grad():
        module.bn1.running_mean.uniform_(-0.2, 0.2)
        module.bn1.running_var.uniform_(0.5, 1.5)
    example = torch.randn(2, 3, 8, 8)
    buffer = io.BytesIO()
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["input"],
                                    output_names=["output"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
        return program.model_proto
    torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["input"],
                      output_names=["output"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


# --- quantized graphs (issue 9, item 5) --------------------------------------------------------


def quantized_dynamic_by_hand(*, float_stem: bool = False, ir_version: int = 6) -> onnx.ModelProto:
    """onnxruntime ``quantize_dynamic`` output, written by hand: IR 6, opset 11 plus
    ``com.microsoft`` and ``ai.onnx.ml`` imports, ``DynamicQuantizeLinear`` -> ``ConvInteger``
    -> Cast/Mul rescale -> Relu -> Flatten -> ``com.microsoft::DynamicQuantizeMatMul``; and
    ``value_info`` entries without shapes, one of them naming the graph output (IR < 7 allows
    them; graph-surgeon then takes the output's type from there).

    With ``float_stem``, two float convs (stem1 -> stem2) come first: stem1 is prunable, so the
    pruned model goes through the export with those forms.
    """
    n = _Net(61)
    x = "input"
    if float_stem:
        x = n.relu("stem_relu1", n.conv("stem1", x, 3, 8))
        x = n.relu("stem_relu2", n.conv("stem2", x, 8, 3))
    n.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], ["x_q", "x_scale", "x_zp"],
                                    name="input_QuantizeLinear"))
    w_q = n.const("conv.weight_quantized", n.rng.integers(0, 255, [8, 3, 3, 3], np.uint8))
    w_zp = n.const("conv.weight_zero_point", np.uint8(128))
    y = n.op("ConvInteger", "/conv/Conv_quant", ["x_q", w_q, "x_zp", w_zp], pads=[1, 1, 1, 1])
    y = n.op("Cast", "/conv/Conv_quant_cast", [y], to=TensorProto.FLOAT)
    scale = n.op("Mul", "/conv/Conv_quant_scales_mul", [
        "x_scale", n.const("conv.weight_scale", np.float32(0.004))])
    y = n.relu("/relu/Relu", n.op("Mul", "/conv/Conv_quant_output_scale_mul", [y, scale]))
    y = n.op("Flatten", "/Flatten", [y], axis=1)
    b_q = n.const("fc.weight_quantized", n.rng.integers(-100, 100, [8 * 8 * 8, 5], np.int8))
    n.nodes.append(helper.make_node(
        "DynamicQuantizeMatMul", [y, b_q, n.const("fc.weight_scale", np.float32(0.001)),
                                  n.const("fc.weight_zero_point", np.int8(0)),
                                  n.randn("fc.bias", [5], 0.1)],
        ["output"], name="/fc/Gemm_MatMul_quant", domain="com.microsoft"))
    model = n.model({"output": [1, 5]})
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 11),
                               helper.make_opsetid("com.microsoft", 1),
                               helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = ir_version
    model.producer_name, model.producer_version = "onnx.quantize", "0.1.0"
    for name in ("/conv/Conv_quant_output_0", "/Flatten_out", "output"):
        model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    return model


def quantized_dynamic_torch(directory) -> onnx.ModelProto:
    """A torch CNN + LSTM + Linear, exported (opset 12) and run through onnxruntime's
    ``quantize_dynamic``: ConvInteger, MatMulInteger, DynamicQuantizeLinear and
    ``com.microsoft::DynamicQuantizeLSTM``."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class ConvLSTM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(64, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(2)
            y, _ = self.lstm(x)
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    source, target = f"{directory}/float.onnx", f"{directory}/quantized.onnx"
    torch.onnx.export(ConvLSTM().eval(), (torch.randn(1, 3, 8, 8),), source, dynamo=False,
                      opset_version=12, input_names=["input"], output_names=["output"])
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm", "LSTM"])
    return onnx.load(target)


__all__ = [
    "paddle_reshape_zero_minus_one",
    "quantized_dynamic_by_hand",
    "quantized_dynamic_torch",
    "resize_computed_channel_sizes",
    "resize_computed_sizes",
    "slice_bounds_partly_computed",
    "tf2onnx_computed_flatten",
    "torch_view_batch",
]

"""Constant padding channels before a residual Add (BlazeFace's blocks; issue 20).

MediaPipe's BlazeFace widens a residual block by appending zero channels to its short cut:
``Add(Conv1x1(DWConv(x)), Concat(MaxPool(x), zeros))``, the zeros written as a
``ConstantOfShape`` (of a constant or a computed shape), a zero initializer, or, by tf2onnx, a
``Pad`` on the channel axis (axis 3 in NHWC, between Transposes). The padding channels are their
own constant channels: the main branch's channels that meet them at the Add are prunable, and
pruning one shrinks the padding by one; the channels that meet the short cut's real channels
stay coupled with them.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import check_pruned

C_IN, C_MID, C_OUT, PAD = 3, 8, 12, 4  # the short cut's 8 channels + 4 zero channels = 12
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


class _Block:
    """stem Conv -> [dwconv -> proj] + [MaxPool -> pad] -> Add -> Relu -> head Conv."""

    def __init__(self, form: str, nhwc: bool, symbolic: bool) -> None:
        self.form, self.nhwc, self.symbolic = form, nhwc, symbolic
        self.rng = np.random.default_rng(7)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, **attrs) -> str:
        group = int(attrs.get("group", 1))
        w = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)
        b = self.rng.standard_normal(cout).astype(np.float32) * 0.1
        return self.node("Conv", [x, self.const(f"{name}.weight", (w / np.sqrt(w[0].size)).astype(np.float32)),
                                  self.const(f"{name}.bias", b)], name, **attrs)

    def nchw(self, x: str, name: str) -> str:
        return self.node("Transpose", [x], name, perm=TO_NCHW) if self.nhwc else x

    def back(self, x: str, name: str) -> str:
        return self.node("Transpose", [x], name, perm=TO_NHWC) if self.nhwc else x

    def padded(self, x: str) -> str:
        """``x`` (the pooled short cut, in the block's layout) with PAD zero channels after."""
        axis = 3 if self.nhwc else 1
        zeros_shape = [1, 8, 8, PAD] if self.nhwc else [1, PAD, 8, 8]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        if self.form == "pad":
            pads = [0] * 8
            pads[4 + axis] = PAD
            return self.node("Pad", [x, self.const("pad_pads", np.array(pads, np.int64))],
                             "pad", mode="constant")
        if self.form == "initializer":
            zeros = self.const("pad_zeros", np.zeros(zeros_shape, np.float32))
        elif self.form == "constant_of_shape":
            shape = self.const("pad_shape", np.array(zeros_shape, np.int64))
            zeros = self.node("ConstantOfShape", [shape], "pad_zeros", value=zero)
        else:  # computed: Concat(Shape(x)[:axis], [PAD], Shape(x)[axis+1:]), as tf2onnx writes
            dims = self.node("Shape", [x], "pad_dims")
            parts = [self.node("Slice", [dims, self.const("s0", np.array([0], np.int64)),
                                         self.const("s1", np.array([axis], np.int64))],
                               "pad_lead"),
                     self.const("pad_width", np.array([PAD], np.int64))]
            if axis < 3:
                parts.append(self.node("Slice", [dims, self.const("s2", np.array([axis + 1],
                                                                                  np.int64)),
                                                 self.const("s3", np.array([4], np.int64))],
                                       "pad_tail"))
            zeros = self.node("ConstantOfShape", [self.node("Concat", parts, "pad_shape",
                                                            axis=0)], "pad_zeros", value=zero)
        return self.node("Concat", [x, zeros], "pad", axis=axis)

    def model(self) -> onnx.ModelProto:
        stem = self.node("Relu", [self.conv("stem", self.nchw("input", "in_nchw"), C_IN, C_MID, 3,
                                            pads=[1, 1, 1, 1])], "stem_relu")
        x = self.back(stem, "stem_nhwc")
        main = self.conv("dw", self.nchw(x, "dw_nchw"), C_MID, C_MID, 3, group=C_MID,
                         strides=[2, 2], pads=[1, 1, 1, 1])
        main = self.back(self.conv("proj", main, C_MID, C_OUT, 1), "proj_nhwc")
        pooled = self.back(self.node("MaxPool", [self.nchw(x, "pool_nchw")], "pool",
                                     kernel_shape=[2, 2], strides=[2, 2]), "pool_nhwc")
        y = self.node("Relu", [self.node("Add", [main, self.padded(pooled)], "add")], "act")
        self.conv("head", self.nchw(y, "head_nchw"), C_OUT, 4, 1)
        self.nodes[-1].output[0] = "output"
        size = ["N", 16, 16] if self.symbolic else [1, 16, 16]
        dims = [size[0], size[1], size[2], C_IN] if self.nhwc else [size[0], C_IN, *size[1:]]
        graph = helper.make_graph(
            self.nodes, "blaze_block",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [size[0], 4, 8, 8])],
            self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=8)


FORMS = [("constant_of_shape", False), ("computed", False), ("initializer", False),
         ("pad", False), ("pad", True), ("constant_of_shape", True), ("computed", True)]


@pytest.mark.parametrize(("form", "nhwc"), FORMS,
                         ids=[f"{f}-{'nhwc' if h else 'nchw'}" for f, h in FORMS])
def test_padding_channels_are_their_own_constant_block(form: str, nhwc: bool) -> None:
    model = _Block(form, nhwc, symbolic=form == "computed").model()
    result = onnx_fpgm.prune(model, 0.5)
    groups = [g for g in result.report.groups if "proj" in g.producers]
    assert len(groups) == 1 and not groups[0].frozen, groups
    layers = {layer.name: layer for layer in result.report.layers}
    kept_proj, kept_stem = layers["proj"].kept, layers["stem"].kept
    assert len(kept_proj) < C_OUT
    # channel i < C_MID of proj meets stem's channel i; the others meet the padding
    assert [k for k in kept_proj if k < C_MID] == kept_stem
    check_pruned(model, result)
    pad_left = len(kept_proj) - len(kept_stem)
    width = _padding_width(result.model, form, nhwc)
    assert width == pad_left, (width, pad_left)


def _padding_width(model: onnx.ModelProto, form: str, nhwc: bool) -> int:
    """The padding's channel count in the pruned model, read where it is written."""
    axis = 3 if nhwc else 1
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == "pad")
    if form == "pad":
        return int(stored[node.input[1]][4 + axis])
    if form == "initializer":
        return int(stored[node.input[1]].shape[axis])
    if form == "constant_of_shape":
        zeros = next(n for n in model.graph.node if n.output[0] == node.input[1])
        return int(stored[zeros.input[0]][axis])
    width = next(n for n in model.graph.node if n.name.startswith("pad_shape"))
    return int(stored[width.input[1]][0])


@pytest.mark.parametrize("form", ["constant_of_shape", "computed", "pad", "initializer"])
def test_plan_keeps_part_of_the_padding(form: str, tmp_path) -> None:
    """A saved plan that keeps two of the four padding channels: the padding shrinks to two,
    at the positions the plan keeps (the first test's plans drop all of it)."""
    model = _Block(form, form == "pad", symbolic=form == "computed").model()
    kept = {"stem": [0, 1, 2, 3, 5, 6, 7], "proj": [0, 1, 2, 3, 5, 6, 7, 9, 11]}
    result = _pruned_keeping(model, kept, tmp_path)
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["proj"].kept == kept["proj"] and layers["stem"].kept == kept["stem"]
    check_pruned(model, result)
    assert _padding_width(result.model, form, form == "pad") == 2



def _pruned_keeping(model: onnx.ModelProto, kept: dict[str, list[int]], tmp_path):
    """``model`` pruned by a saved plan: the sparsity-0.5 plan with ``kept`` (layer name ->
    kept channels) written over it."""
    plan = json.loads(onnx_fpgm.prune(model, 0.5).report.to_json())
    for layer in plan["layers"]:
        layer["kept"] = kept.get(layer["name"], layer["kept"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return onnx_fpgm.prune(model, plan=str(path))

def _two_blocks(form: str) -> onnx.ModelProto:
    """Two stride-1 blocks widening 8 -> 12 -> 16 that share one zeros tensor (tf2onnx writes
    one constant for equal ones): ``y = relu(proj(dw(x)) + Concat(x, zeros))``, twice."""
    net = _Block(form, nhwc=False, symbolic=False)
    if form == "initializer":
        zeros = net.const("zeros", np.zeros((1, PAD, 16, 16), np.float32))
    else:
        zeros = net.node("ConstantOfShape", [net.const("zeros_shape", np.array(
            [1, PAD, 16, 16], np.int64))], "zeros",
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    x = net.node("Relu", [net.conv("stem", "input", C_IN, C_MID, 3, pads=[1, 1, 1, 1])], "r0")
    for k, width in ((1, C_MID), (2, C_MID + PAD)):
        main = net.conv(f"dw{k}", x, width, width, 3, group=width, pads=[1, 1, 1, 1])
        main = net.conv(f"proj{k}", main, width, width + PAD, 1)
        short = net.node("Concat", [x, zeros], f"pad{k}", axis=1)
        x = net.node("Relu", [net.node("Add", [main, short], f"add{k}")], f"act{k}")
    net.conv("head", x, C_MID + 2 * PAD, 4, 1)
    net.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        net.nodes, "two_blocks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C_IN, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 16, 16])], net.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("form", ["constant_of_shape", "initializer"])
def test_shared_zeros_narrowed_per_block(form: str, tmp_path) -> None:
    """The blocks keep different padding widths (1 and 3): each gets its own zeros, the
    shared ones are copied for the block that reads them first (copy on write)."""
    model = _two_blocks(form)
    stem = [0, 1, 2, 4, 5, 6]
    proj1 = [*stem, 10]  # one of block 1's four padding channels
    kept = {"stem": stem, "proj1": proj1, "proj2": [*proj1, 12, 14, 15]}
    result = _pruned_keeping(model, kept, tmp_path)
    layers = {layer.name: layer for layer in result.report.layers}
    assert {name: layers[name].kept for name in kept} == kept
    check_pruned(model, result)
    widths = {}
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    producers = {out: n for n in result.model.graph.node for out in n.output}
    for k in (1, 2):
        concat = next(n for n in result.model.graph.node if n.name == f"pad{k}")
        zeros = concat.input[1]
        widths[k] = int(stored[zeros].shape[1] if zeros in stored else
                        stored[producers[zeros].input[0]][1])
    assert widths == {1: 1, 2: 3}

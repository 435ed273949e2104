"""Hand-built ONNX models in the forms real exporters write, which torch.onnx.export won't produce.

Each entry of `PATTERNS` is a `Case`: a deterministic zero-argument builder plus the names of the
producer nodes (Conv/ConvTranspose/Gemm/MatMul) whose *output* channels the pruning engine must be
able to prune (`prunable`) or must leave alone (`frozen`). A producer that is in neither set is
one whose answer depends on engine policy (e.g. a depthwise conv riding along in its input's
group, or convs sharing one weight initializer); the `note` says why.

Conventions, shared by every model unless its note says otherwise:

* opset 17, `ir_version = 8`, one float32 graph input "input" of static batch 1, one graph output
  "output" whose channels come from a frozen "head" producer;
* every node has a unique, non-empty name; tensors are named `<node>_out` and initializers
  `<node>.weight` / `<node>.bias` (torch style);
* initializers are drawn from `np.random.default_rng(zlib.crc32(pattern_name))`, so two builds
  serialize to identical bytes; conv weights are scaled by 1/sqrt(fan_in) to keep activations O(1);
  BatchNormalization gets positive variance and non-trivial scale/bias/mean.

Layout facts the engine must respect: Conv weight is [Cout, Cin/conv_group, kH, kW]; ConvTranspose
weight is [Cin, Cout/conv_group, kH, kW] (output channels on axis 1); Gemm B is [K, N] or, with
transB=1, [N, K]; MatMul B is [K, N].
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["PATTERNS", "Case"]

Shape = Sequence[int | str]


@dataclass(frozen=True)
class Case:
    """One catalogue entry.

    Attributes:
        build: Deterministic (seeded) builder of the model.
        prunable: Producer nodes whose output channels the engine must be able to prune.
        frozen: Producer nodes whose output channels must not be pruned (blocked).
        note: Why; what the engine must do or is allowed to do.
    """

    build: Callable[[], onnx.ModelProto]
    prunable: frozenset[str]
    frozen: frozenset[str]
    note: str = ""


PATTERNS: dict[str, Case] = {}


class _Net:
    """Accumulates nodes and initializers for one model; all randomness from one seeded rng."""

    def __init__(self, seed: int, *, constants: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.constants = constants  # paddle2onnx style: parameters as Constant nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(
        self, name: str, value: np.ndarray | np.generic, *, as_node: bool | None = None
    ) -> str:
        """Adds `value` as an initializer or, paddle-style, as a Constant node; returns its name."""
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.constants if as_node is None else as_node:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def ints(self, name: str, values: Sequence[int], *, as_node: bool | None = None) -> str:
        return self.const(name, np.array(values, dtype=np.int64), as_node=as_node)

    def randn(self, name: str, shape: Sequence[int], scale: float = 1.0) -> str:
        value = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return self.const(name, value)

    def op(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[str],
        *,
        n_out: int = 1,
        out: str | None = None,
        **attrs: object,
    ) -> str:
        """Appends a node; returns its output name (the first one when `n_out` > 1)."""
        outputs = [out or f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        stride: int = 1,
        conv_group: int = 1,
        bias: bool = True,
        weight: str | None = None,
        out: str | None = None,
    ) -> str:
        fan_in = cin // conv_group * k * k
        w = weight or self.randn(f"{name}.weight", [cout, cin // conv_group, k, k], fan_in**-0.5)
        inputs = [x, w] + ([self.randn(f"{name}.bias", [cout], 0.1)] if bias else [])
        p = k // 2
        return self.op(
            "Conv",
            name,
            inputs,
            out=out,
            kernel_shape=[k, k],
            pads=[p, p, p, p],
            strides=[stride, stride],
            group=conv_group,
        )

    def bn(self, name: str, x: str, c: int) -> str:
        params = [
            self.const(f"{name}.weight", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
            self.randn(f"{name}.bias", [c], 0.1),
            self.randn(f"{name}.running_mean", [c], 0.1),
            self.const(f"{name}.running_var", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", name, [x, *params], epsilon=1e-5)

    def relu(self, name: str, x: str) -> str:
        return self.op("Relu", name, [x])

    def head(self, x: str, cin: int, cout: int = 4) -> str:
        """The frozen 1x1 Conv whose output channels are the graph output."""
        return self.conv("head", x, cin, cout, k=1, out="output")

    def matmul_add(self, name: str, x: str, fin: int, fout: int, *, out: str | None = None) -> str:
        """MatMul node `name` plus Add node `<name>_bias` (the tf2onnx/dynamo Linear form)."""
        y = self.op("MatMul", name, [x, self.randn(f"{name}.weight", [fin, fout], fin**-0.5)])
        return self.op("Add", f"{name}_bias", [y, self.randn(f"{name}.bias", [fout], 0.1)], out=out)

    def model(
        self,
        outputs: dict[str, Shape],
        inputs: dict[str, Shape] | None = None,
        *,
        opset: int = 17,
    ) -> onnx.ModelProto:
        """Wraps the graph; default input "input" [1,3,8,8]; all graph inputs are float32."""
        inputs = {"input": [1, 3, 8, 8]} if inputs is None else inputs
        graph = helper.make_graph(
            self.nodes,
            "pattern",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx_patterns"
        )
        model.ir_version = 8
        return model


def _pattern(
    name: str,
    prunable: Sequence[str] = (),
    frozen: Sequence[str] = ("head",),
    note: str = "",
    *,
    constants: bool = False,
) -> Callable[[Callable[[_Net], onnx.ModelProto]], Callable[[_Net], onnx.ModelProto]]:
    """Registers `fn(net) -> ModelProto` under `name` with a per-name fixed seed."""

    def register(fn: Callable[[_Net], onnx.ModelProto]) -> Callable[[_Net], onnx.ModelProto]:
        if name in PATTERNS:
            raise ValueError(f"duplicate pattern {name!r}")
        seed = zlib.crc32(name.encode())

        def build() -> onnx.ModelProto:
            return fn(_Net(seed, constants=constants))

        PATTERNS[name] = Case(build, frozenset(prunable), frozenset(frozen), note)
        return fn

    return register


# --- Conv + normalisation -------------------------------------------------------------------


@_pattern("conv_bn_relu_conv", ["conv1"])
def _conv_bn_relu_conv(n: _Net) -> onnx.ModelProto:
    n.head(n.relu("relu1", n.bn("bn1", n.conv("conv1", "input", 3, 8), 8)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "conv_bn_unfolded_vs_folded",
    ["conv1"],
    note="Bias-free Conv followed by BatchNormalization (unfolded); another test folds it.",
)
def _conv_bn_unfolded(n: _Net) -> onnx.ModelProto:
    n.head(n.relu("relu1", n.bn("bn1", n.conv("conv1", "input", 3, 8, bias=False), 8)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "symbolic_batch",
    ["conv1"],
    note="Input shape ['N', 3, 8, 8]; reshape-free, so the symbolic batch flows to the output.",
)
def _symbolic_batch(n: _Net) -> onnx.ModelProto:
    n.head(n.relu("relu1", n.bn("bn1", n.conv("conv1", "input", 3, 8), 8)), 8)
    return n.model({"output": ["N", 4, 8, 8]}, {"input": ["N", 3, 8, 8]})


@_pattern("instance_norm", ["conv1"], note="InstanceNormalization scale/B are per channel [C].")
def _instance_norm(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8)
    scale = n.const("in1.weight", n.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = n.op("InstanceNormalization", "in1", [x, scale, n.randn("in1.bias", [8], 0.1)])
    n.head(n.relu("relu1", x), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "group_norm",
    frozen=["conv1", "head"],
    note="opset 21 GroupNormalization (scale/bias [C]): onnx 1.23's checker rejects the opset-18 "
    "form as deprecated. ir_version stays 8 (older than opset 21's IR 10; checker and ORT accept "
    "it). Statistics are over groups of channels, so removing a channel changes the others.",
)
def _group_norm(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8)
    scale = n.const("gn1.weight", n.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = n.op(
        "GroupNormalization", "gn1", [x, scale, n.randn("gn1.bias", [8], 0.1)], num_groups=2
    )
    n.head(x, 8)
    return n.model({"output": [1, 4, 8, 8]}, opset=21)


@_pattern(
    "layer_norm_over_channels",
    frozen=["conv1", "head"],
    note="LayerNormalization over the channel axis (after NCHW->NHWC): mean/var mix channels.",
)
def _layer_norm_over_channels(n: _Net) -> onnx.ModelProto:
    x = n.op("Transpose", "to_nhwc", [n.conv("conv1", "input", 3, 8)], perm=[0, 2, 3, 1])
    scale = n.const("ln1.weight", n.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = n.op("LayerNormalization", "ln1", [x, scale, n.randn("ln1.bias", [8], 0.1)], axis=-1)
    n.head(n.op("Transpose", "to_nchw", [x], perm=[0, 3, 1, 2]), 8)
    return n.model({"output": [1, 4, 8, 8]})


# --- Where the weights come from ------------------------------------------------------------


@_pattern(
    "paddle_constant_weights",
    ["conv1"],
    note="paddle2onnx: no initializers at all; every parameter is a Constant node, the conv "
    "bias is Add(Reshape(Constant[C], Constant[1,C,1,1])). The engine must rewrite Constant "
    "values (and the reshape target is [1,C,1,1], carrying C).",
    constants=True,
)
def _paddle_constant_weights(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8, bias=False)
    bias, shape = n.randn("conv1.bias", [8], 0.1), n.ints("conv1_bias_shape", [1, 8, 1, 1])
    b = n.op("Reshape", "conv1_bias_reshape", [bias, shape])
    x = n.op("Add", "conv1_bias_add", [x, b])
    n.head(n.relu("relu1", n.bn("bn1", x, 8)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "paddle_bias_add",
    ["conv1"],
    note="Weights are initializers but the conv bias is Add(Reshape(Constant [C] -> [1,C,1,1])) "
    "in front of BatchNormalization; the Constant bias and its shape Constant both carry C.",
)
def _paddle_bias_add(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8, bias=False)
    bias = n.const("conv1.bias", n.rng.standard_normal(8).astype(np.float32) * 0.1, as_node=True)
    shape = n.ints("conv1_bias_shape", [1, 8, 1, 1], as_node=True)
    x = n.op("Add", "conv1_bias_add", [x, n.op("Reshape", "conv1_bias_reshape", [bias, shape])])
    n.head(n.relu("relu1", n.bn("bn1", x, 8)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern("weight_behind_identity", ["conv1"], note="Weight initializer -> Identity -> Conv.")
def _weight_behind_identity(n: _Net) -> onnx.ModelProto:
    w = n.op("Identity", "conv1_weight_identity", [n.randn("conv1.weight", [8, 3, 3, 3], 27**-0.5)])
    n.head(n.relu("relu1", n.conv("conv1", "input", 3, 8, weight=w)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "weight_behind_cast",
    ["conv1"],
    note="fp16 weight initializer -> Cast(to=FLOAT) -> Conv; slice the fp16 tensor, keep fp16.",
)
def _weight_behind_cast(n: _Net) -> onnx.ModelProto:
    w16 = (n.rng.standard_normal([8, 3, 3, 3]) * 27**-0.5).astype(np.float16)
    w16 = n.const("conv1.weight", w16)
    w = n.op("Cast", "conv1_weight_cast", [w16], to=TensorProto.FLOAT)
    n.head(n.relu("relu1", n.conv("conv1", "input", 3, 8, weight=w)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "weight_computed",
    ["conv1"],
    note="Weight = Mul(raw [C,Cin,k,k], per-filter scale [C,1,1,1]), a constant subgraph (weight "
    "norm / dequant style): score the folded product, slice both factors on axis 0.",
)
def _weight_computed(n: _Net) -> onnx.ModelProto:
    raw = n.randn("conv1.weight_raw", [8, 3, 3, 3], 27**-0.5)
    scale = n.const("conv1.weight_scale", n.rng.uniform(0.5, 1.5, [8, 1, 1, 1]).astype(np.float32))
    w = n.op("Mul", "conv1_weight_mul", [raw, scale])
    n.head(n.relu("relu1", n.conv("conv1", "input", 3, 8, weight=w)), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "weight_from_graph_input",
    frozen=["conv1", "head"],
    note="conv1's weight is a second graph input 'w' [8,3,3,3]: unknown at prune time, and the "
    "model's input contract can't change. Feed both inputs when running.",
)
def _weight_from_graph_input(n: _Net) -> onnx.ModelProto:
    n.head(n.relu("relu1", n.conv("conv1", "input", 3, 8, weight="w")), 8)
    return n.model({"output": [1, 4, 8, 8]}, {"input": [1, 3, 8, 8], "w": [8, 3, 3, 3]})


# --- NCHW -> flat features (Flatten / Reshape / channels-last) -------------------------------

_FLAT_NOTE = "Flat feature index is c*H*W + s; consumer rows/columns are pruned in blocks of H*W."


@_pattern("nchw_flatten_gemm", ["conv1"], note=_FLAT_NOTE + " Gemm head has transB=1 ([N, K]).")
def _nchw_flatten_gemm(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8, stride=2))  # [1, 8, 4, 4]
    x = n.op("Flatten", "flatten", [x], axis=1)
    w, b = n.randn("head.weight", [10, 128], 128**-0.5), n.randn("head.bias", [10], 0.1)
    n.op("Gemm", "head", [x, w, b], out="output", transB=1)
    return n.model({"output": [1, 10]})


@_pattern("nchw_reshape_matmul", ["conv1"], note=_FLAT_NOTE + " Reshape target [1, -1].")
def _nchw_reshape_matmul(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8, stride=2))
    x = n.op("Reshape", "reshape", [x, n.ints("reshape_shape", [1, -1])])
    n.matmul_add("head", x, 128, 10, out="output")
    return n.model({"output": [1, 10]})


@_pattern(
    "nchw_reshape_literal",
    ["conv1"],
    note=_FLAT_NOTE + " Reshape target is the literal [1, 128] (no -1): the engine must rewrite "
    "it to [1, C'*16].",
)
def _nchw_reshape_literal(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8, stride=2))
    x = n.op("Reshape", "reshape", [x, n.ints("reshape_shape", [1, 128])])
    n.matmul_add("head", x, 128, 10, out="output")
    return n.model({"output": [1, 10]})


@_pattern(
    "channels_last_transpose_matmul",
    ["conv1"],
    note="tf2onnx/Keras: NHWC input [1,8,8,3] -> Transpose -> Conv -> Transpose back to NHWC -> "
    "Reshape [1,-1]. Flat index is s*C + c (interleaved), not c*H*W + s: MatMul rows of channel "
    "c are c, c+C, c+2C, ...",
)
def _channels_last(n: _Net) -> onnx.ModelProto:
    x = n.op("Transpose", "to_nchw", ["input"], perm=[0, 3, 1, 2])
    x = n.relu("relu1", n.conv("conv1", x, 3, 8, stride=2))
    x = n.op("Transpose", "to_nhwc", [x], perm=[0, 2, 3, 1])  # [1, 4, 4, 8]
    x = n.op("Reshape", "reshape", [x, n.ints("reshape_shape", [1, -1])])
    n.matmul_add("head", x, 128, 10, out="output")
    return n.model({"output": [1, 10]}, {"input": [1, 8, 8, 3]})


@_pattern(
    "squeeze_unsqueeze",
    ["conv1", "fc1"],
    note="GlobalAveragePool -> Squeeze(axes input [2,3]) -> Gemm fc1 (transB=1) -> Relu -> "
    "Unsqueeze(axes input [2,3]) -> 1x1 Conv head; fc1's outputs become the head's input channels.",
)
def _squeeze_unsqueeze(n: _Net) -> onnx.ModelProto:
    x = n.op("GlobalAveragePool", "gap", [n.relu("relu1", n.conv("conv1", "input", 3, 8))])
    x = n.op("Squeeze", "squeeze", [x, n.ints("squeeze_axes", [2, 3])])
    w, b = n.randn("fc1.weight", [16, 8], 8**-0.5), n.randn("fc1.bias", [16], 0.1)
    x = n.relu("relu_fc1", n.op("Gemm", "fc1", [x, w, b], transB=1))
    n.head(n.op("Unsqueeze", "unsqueeze", [x, n.ints("unsqueeze_axes", [2, 3])]), 16)
    return n.model({"output": [1, 4, 1, 1]})


# --- Per-channel elementwise ----------------------------------------------------------------


@_pattern(
    "constant_subgraph_per_channel",
    ["conv1"],
    note="Mul by a per-channel scale computed by a constant subgraph: "
    "Reshape(Div(a[C], Sqrt(Constant b[C])), [1,C,1,1]). Fold it, or slice a, b and the shape.",
)
def _constant_subgraph_per_channel(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8)
    b = n.const("scale_b", n.rng.uniform(0.5, 2.0, 8).astype(np.float32), as_node=True)
    a = n.const("scale_a", n.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    s = n.op("Div", "scale_div", [a, n.op("Sqrt", "scale_sqrt", [b])])
    s = n.op("Reshape", "scale_reshape", [s, n.ints("scale_shape", [1, 8, 1, 1])])
    n.head(n.relu("relu1", n.op("Mul", "scale_mul", [x, s])), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern("prelu_per_channel", ["conv1"], note="PRelu slope [C,1,1] is sliced on axis 0.")
def _prelu_per_channel(n: _Net) -> onnx.ModelProto:
    slope = n.const("prelu1.slope", n.rng.uniform(0.05, 0.3, [8, 1, 1]).astype(np.float32))
    n.head(n.op("PRelu", "prelu1", [n.conv("conv1", "input", 3, 8), slope]), 8)
    return n.model({"output": [1, 4, 8, 8]})


# --- Split / Slice / Concat -----------------------------------------------------------------


def _split_branches(n: _Net, split: str) -> None:
    """conv1(16) -> `split` (two outputs of 8) -> conv_a, conv_b -> Concat -> head."""
    x = n.conv("conv1", "input", 3, 16)
    name = "split"
    if split == "attr":
        n.op("Split", name, [x], n_out=2, axis=1, split=[8, 8])
    elif split == "input":
        n.op("Split", name, [x, n.ints("split_sizes", [8, 8])], n_out=2, axis=1)
    else:
        n.op("Split", name, [x], n_out=2, axis=1, num_outputs=2)
    a = n.conv("conv_a", n.relu("relu_a", f"{name}_out0"), 8, 8)
    b = n.conv("conv_b", n.relu("relu_b", f"{name}_out1"), 8, 8)
    n.head(n.op("Concat", "concat", [a, b], axis=1), 16)


_SPLIT_NOTE = (
    "conv1's channels 0-7 feed conv_a, 8-15 feed conv_b; pruning conv1 unevenly must rewrite the "
    "split sizes. conv_a and conv_b are independent groups, offset 0 and 8 in the Concat."
)


@_pattern(
    "split_opset11_attr",
    ["conv1", "conv_a", "conv_b"],
    note="opset 11, split attribute. " + _SPLIT_NOTE,
)
def _split_opset11(n: _Net) -> onnx.ModelProto:
    _split_branches(n, "attr")
    return n.model({"output": [1, 4, 8, 8]}, opset=11)


@_pattern(
    "split_opset13_input",
    ["conv1", "conv_a", "conv_b"],
    note="opset 13, split sizes as an int64 initializer input. " + _SPLIT_NOTE,
)
def _split_opset13(n: _Net) -> onnx.ModelProto:
    _split_branches(n, "input")
    return n.model({"output": [1, 4, 8, 8]}, opset=13)


@_pattern(
    "split_opset18_num_outputs",
    ["conv1", "conv_a", "conv_b"],
    note="opset 18, num_outputs=2 (even split): an uneven prune must switch to an explicit "
    "split input. " + _SPLIT_NOTE,
)
def _split_opset18(n: _Net) -> onnx.ModelProto:
    _split_branches(n, "num_outputs")
    return n.model({"output": [1, 4, 8, 8]}, opset=18)


@_pattern(
    "slice_channel_partial_residual",
    ["conv1", "conv2"],
    note="DPN/GhostNet: conv1(16) -> Slice[0:8] (Added to conv2's 8 channels) and Slice[8:16] "
    "(Concat'ed after the sum). Groups: {conv1[0:8], conv2} coupled by the Add, and {conv1[8:16]} "
    "at Concat offset 8. Slice ends (int64 initializers) must be rewritten.",
)
def _slice_partial_residual(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 16)
    axes = n.ints("slice_axes", [1])
    starts, ends = n.ints("slice_a_starts", [0]), n.ints("slice_a_ends", [8])
    lo = n.op("Slice", "slice_a", [x, starts, ends, axes])
    starts, ends = n.ints("slice_b_starts", [8]), n.ints("slice_b_ends", [16])
    hi = n.op("Slice", "slice_b", [x, starts, ends, axes])
    res = n.op("Add", "add_res", [lo, n.conv("conv2", "input", 3, 8)])
    n.head(n.relu("relu1", n.op("Concat", "concat", [res, hi], axis=1)), 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "concat_skip",
    ["conv_a", "conv_b"],
    note="Channel Concat: conv_a and conv_b are independent groups at offsets 0 and 8.",
)
def _concat_skip(n: _Net) -> onnx.ModelProto:
    a, b = n.conv("conv_a", "input", 3, 8), n.conv("conv_b", "input", 3, 8)
    n.head(n.relu("relu1", n.op("Concat", "concat", [a, b], axis=1)), 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "concat_non_channel_axis",
    ["conv_a", "conv_b"],
    note="Concat on axis 2 (height): conv_a and conv_b share the channel axis, ONE group.",
)
def _concat_non_channel_axis(n: _Net) -> onnx.ModelProto:
    a, b = n.conv("conv_a", "input", 3, 8), n.conv("conv_b", "input", 3, 8)
    n.head(n.relu("relu1", n.op("Concat", "concat", [a, b], axis=2)), 8)
    return n.model({"output": [1, 4, 16, 8]})


# --- Resize / Pad ---------------------------------------------------------------------------


@_pattern(
    "resize_sizes",
    ["conv1"],
    note="Resize(nearest) with roi/scales empty and sizes [1,C,16,16]: sizes[1] carries C and "
    "must be rewritten.",
)
def _resize_sizes(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    sizes = n.ints("resize_sizes", [1, 8, 16, 16])
    x = n.op("Resize", "resize", [x, "", "", sizes], mode="nearest")
    n.head(x, 8)
    return n.model({"output": [1, 4, 16, 16]})


@_pattern("resize_scales", ["conv1"], note="Resize(nearest) with scales [1,1,2,2]; no C in it.")
def _resize_scales(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    scales = n.const("resize_scales", np.array([1, 1, 2, 2], dtype=np.float32))
    n.head(n.op("Resize", "resize", [x, "", scales], mode="nearest"), 8)
    return n.model({"output": [1, 4, 16, 16]})


@_pattern("pad_spatial", ["conv1"], note="Constant Pad on H and W only; channels pass through.")
def _pad_spatial(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    pads = n.ints("pad_pads", [0, 0, 1, 1, 0, 0, 1, 1])
    value = n.const("pad_value", np.array(0.0, np.float32))
    x = n.op("Pad", "pad", [x, pads, value], mode="constant")
    n.conv("head", x, 8, 4, k=3, out="output")
    return n.model({"output": [1, 4, 10, 10]})


@_pattern(
    "pad_channel",
    ["conv1"],
    frozen=["head"],
    note="Pad adds 2 zero channels in front of conv1's 8: constant channels of their own "
    "(they meet no filters, so they stay); conv1's channels prune behind them.",
)
def _pad_channel(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    x = n.op("Pad", "pad", [x, n.ints("pad_pads", [0, 2, 0, 0, 0, 0, 0, 0])], mode="constant")
    n.head(x, 10)
    return n.model({"output": [1, 4, 8, 8]})


# --- Consumers that block -------------------------------------------------------------------


@_pattern(
    "lstm_consumer",
    prunable=["conv1"],
    frozen=(),
    note="conv1 -> Reshape [1,C,HW] -> Transpose [T,1,C] -> LSTM (input_size C) -> output. "
    "The LSTM consumes conv1's channels as input features (W sliced on axis 2); its hidden "
    "units are the graph output and stay. No head producer here.",
)
def _lstm_consumer(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8, stride=2))  # [1, 8, 4, 4]
    x = n.op("Reshape", "reshape", [x, n.ints("reshape_shape", [1, 8, 16])])
    x = n.op("Transpose", "to_seq", [x], perm=[2, 0, 1])  # [16, 1, 8]
    h = 6
    w = n.randn("lstm.W", [1, 4 * h, 8], 8**-0.5)
    r = n.randn("lstm.R", [1, 4 * h, h], h**-0.5)
    b = n.randn("lstm.B", [1, 8 * h], 0.1)
    n.op("LSTM", "lstm", [x, w, r, b], out="output", hidden_size=h)
    return n.model({"output": [16, 1, 1, h]})


@_pattern(
    "unknown_op",
    frozen=["conv1", "head"],
    note="LpNormalization(axis=1) mixes channels and has no handler: fail closed.",
)
def _unknown_op(n: _Net) -> onnx.ModelProto:
    x = n.op("LpNormalization", "lpnorm", [n.conv("conv1", "input", 3, 8)], axis=1, p=2)
    n.head(x, 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "conv_to_graph_output",
    frozen=["conv1", "head"],
    note="conv1's output is a graph output ('conv1_out') as well as the head's input.",
)
def _conv_to_graph_output(n: _Net) -> onnx.ModelProto:
    n.head(n.conv("conv1", "input", 3, 8), 8)
    return n.model({"output": [1, 4, 8, 8], "conv1_out": [1, 8, 8, 8]})


@_pattern(
    "channel_shuffle",
    prunable=["conv1"],
    frozen=["head"],
    note="ShuffleNet: Reshape [1,2,8,H,W] -> Transpose [0,2,1,3,4] -> Reshape [1,16,H,W] "
    "permutes channels across the split dim; the same offset goes from both halves.",
)
def _channel_shuffle(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 16)
    x = n.op("Reshape", "shuffle_reshape1", [x, n.ints("shuffle_shape1", [1, 2, 8, 8, 8])])
    x = n.op("Transpose", "shuffle_transpose", [x], perm=[0, 2, 1, 3, 4])
    x = n.op("Reshape", "shuffle_reshape2", [x, n.ints("shuffle_shape2", [1, 16, 8, 8])])
    n.head(x, 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "reducemean_channel_axis",
    frozen=["conv1", "head"],
    note="ReduceMean over axis 1 (opset 17: axes attribute): the mean changes if a channel goes.",
)
def _reducemean_channel_axis(n: _Net) -> onnx.ModelProto:
    x = n.op("ReduceMean", "reduce", [n.conv("conv1", "input", 3, 8)], axes=[1], keepdims=1)
    n.head(x, 1)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "softmax_channel_axis",
    frozen=["conv1", "head"],
    note="Softmax over axis 1 normalises across channels; blocked.",
)
def _softmax_channel_axis(n: _Net) -> onnx.ModelProto:
    n.head(n.op("Softmax", "softmax", [n.conv("conv1", "input", 3, 8)], axis=1), 8)
    return n.model({"output": [1, 4, 8, 8]})


# --- Conv groups, depthwise, ConvTranspose --------------------------------------------------


@_pattern(
    "depthwise",
    ["conv1"],
    note="dw (group=16, weight [16,1,3,3]) passes channels through: it is in conv1's group and "
    "its filters, bias and group attribute are pruned with conv1 (listed in neither set).",
)
def _depthwise(n: _Net) -> onnx.ModelProto:
    x = n.conv("dw", n.conv("conv1", "input", 3, 16), 16, 16, conv_group=16)
    n.head(n.relu("relu1", x), 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "depthwise_multiplier2",
    frozen=["conv1", "dw", "head"],
    note="dw has group=8 with 16 outputs (multiplier 2): input c maps to outputs 2c, 2c+1. The "
    "engine may block it (expected here); a multiplier-aware engine could move conv1 to prunable.",
)
def _depthwise_multiplier2(n: _Net) -> onnx.ModelProto:
    x = n.conv("dw", n.conv("conv1", "input", 3, 8), 8, 16, conv_group=8)
    n.head(n.relu("relu1", x), 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "grouped_conv",
    ["conv1", "gconv"],
    frozen=["head"],
    note="gconv is group=4 (16->16, not depthwise): its input (conv1) and output channels are "
    "cut at group boundaries and every group keeps the same count.",
)
def _grouped_conv(n: _Net) -> onnx.ModelProto:
    x = n.conv("gconv", n.conv("conv1", "input", 3, 16), 16, 16, conv_group=4)
    n.head(n.relu("relu1", x), 16)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "repvgg_parallel_branches",
    ["c0", "conv3x3", "conv1x1"],
    note="c0 feeds conv3x3+bn and conv1x1+bn summed by Add: conv3x3 and conv1x1 form ONE group; "
    "c0 is its own group (input side of both branches).",
)
def _repvgg(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu0", n.conv("c0", "input", 3, 8))
    a = n.bn("bn3x3", n.conv("conv3x3", x, 8, 8, 3, bias=False), 8)
    b = n.bn("bn1x1", n.conv("conv1x1", x, 8, 8, 1, bias=False), 8)
    n.head(n.relu("relu1", n.op("Add", "add", [a, b])), 8)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "convtranspose_producer_consumer",
    ["conv1", "convT1", "convT2"],
    note="ConvTranspose weight is [Cin, Cout/group, k, k]: output channels are axis 1, input "
    "channels axis 0. convT1 is k2 s2 (8x8 -> 16x16), convT2 k3 s1 p1.",
)
def _convtranspose(n: _Net) -> onnx.ModelProto:
    x = n.conv("conv1", "input", 3, 8)
    w1, b1 = n.randn("convT1.weight", [8, 8, 2, 2], 32**-0.5), n.randn("convT1.bias", [8], 0.1)
    x = n.op("ConvTranspose", "convT1", [x, w1, b1], kernel_shape=[2, 2], strides=[2, 2])
    x = n.relu("relu1", x)
    w2, b2 = n.randn("convT2.weight", [8, 8, 3, 3], 72**-0.5), n.randn("convT2.bias", [8], 0.1)
    x = n.op("ConvTranspose", "convT2", [x, w2, b2], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    n.head(x, 8)
    return n.model({"output": [1, 4, 16, 16]})


@_pattern(
    "shared_weight",
    ["stem"],
    note="conv_a and conv_b share 'shared.weight' on two branches concatenated on axis 1. "
    "Pruning them independently needs copy-on-write (or freezing): policy, so they are in "
    "neither set. stem prunes axis 1 of the shared weight identically for both: unambiguous.",
)
def _shared_weight(n: _Net) -> onnx.ModelProto:
    x = n.relu("relu0", n.conv("stem", "input", 3, 8))
    w = n.randn("shared.weight", [8, 8, 3, 3], 72**-0.5)
    a = n.conv("conv_a", x, 8, 8, weight=w, bias=False)
    pooled = n.op("MaxPool", "pool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = n.conv("conv_b", pooled, 8, 8, weight=w, bias=False)
    n.head(n.op("Concat", "concat", [a, b], axis=1), 16)
    return n.model({"output": [1, 4, 8, 8]})


# --- Squeeze-and-excitation -----------------------------------------------------------------

_SE_NOTE = (
    "conv_ex's outputs are multiplied into conv1's (via relu1): ONE group {conv1, conv_ex}; "
    "conv_sq is its own group."
)


def _se(n: _Net, *, reduce_mean: bool) -> None:
    y = n.relu("relu1", n.conv("conv1", "input", 3, 16))
    if reduce_mean:
        s = n.op("ReduceMean", "pool", [y], axes=[2, 3], keepdims=1)
    else:
        s = n.op("GlobalAveragePool", "pool", [y])
    s = n.conv("conv_ex", n.relu("relu_sq", n.conv("conv_sq", s, 16, 4, k=1)), 4, 16, k=1)
    if reduce_mean:
        s = n.op("HardSigmoid", "gate", [s], alpha=1 / 6, beta=0.5)
    else:
        s = n.op("Sigmoid", "gate", [s])
    n.head(n.op("Mul", "scale", [y, s]), 16)


@_pattern("se_block", ["conv1", "conv_ex", "conv_sq"], note=_SE_NOTE)
def _se_block(n: _Net) -> onnx.ModelProto:
    _se(n, reduce_mean=False)
    return n.model({"output": [1, 4, 8, 8]})


@_pattern(
    "se_block_reducemean_hardsigmoid",
    ["conv1", "conv_ex", "conv_sq"],
    note="MobileNetV3 form: ReduceMean(axes=[2,3], keepdims=1) and HardSigmoid. " + _SE_NOTE,
)
def _se_block_reducemean(n: _Net) -> onnx.ModelProto:
    _se(n, reduce_mean=True)
    return n.model({"output": [1, 4, 8, 8]})


# --- MLPs -----------------------------------------------------------------------------------


@_pattern(
    "mlp_matmul_add_gelu",
    ["fc1"],
    ["fc2"],
    note="Transformer MLP on [1,4,16]; channels are the LAST axis. MatMul B is [K, N]; the bias "
    "is a separate Add; Gelu is x*0.5*(1+Erf(x/sqrt2)) (opset 17 has no Gelu op).",
)
def _mlp_gelu(n: _Net) -> onnx.ModelProto:
    x = n.matmul_add("fc1", "input", 16, 32)
    e = n.op("Div", "gelu_div", [x, n.const("sqrt2", np.float32(2**0.5))])
    e = n.op("Add", "gelu_add", [n.op("Erf", "gelu_erf", [e]), n.const("one", np.float32(1.0))])
    x = n.op("Mul", "gelu_mul", [x, e])
    x = n.op("Mul", "gelu_mul_half", [x, n.const("half", np.float32(0.5))])
    n.matmul_add("fc2", x, 32, 16, out="output")
    return n.model({"output": [1, 4, 16]}, {"input": [1, 4, 16]})


@_pattern(
    "gemm_mlp",
    ["fc1"],
    ["fc2"],
    note="fc1 is Gemm transB=1 (B [32,16]: prune rows); fc2 is Gemm transB=0 (B [32,10]: prune "
    "rows, i.e. its K axis 0).",
)
def _gemm_mlp(n: _Net) -> onnx.ModelProto:
    w1, b1 = n.randn("fc1.weight", [32, 16], 16**-0.5), n.randn("fc1.bias", [32], 0.1)
    x = n.relu("relu1", n.op("Gemm", "fc1", ["input", w1, b1], transB=1))
    w2, b2 = n.randn("fc2.weight", [32, 10], 32**-0.5), n.randn("fc2.bias", [10], 0.1)
    n.op("Gemm", "fc2", [x, w2, b2], out="output")
    return n.model({"output": [1, 10]}, {"input": [1, 16]})

"""Seeded random CNN/MLP DAGs for the architecture property test (``tests/test_fuzz.py``).

``random_model(seed)`` builds a small float32 model with ``onnx.helper``: static batch 1, 4-16
channels, 4-16 spatial (a stride, pool or resize may move it inside 1..32), opset drawn from 11..21
(IR version 8 up to opset 18, else 10), unique node names, 1-2 graph outputs. It strings together
*blocks* chosen at random among the op patterns the engine has handlers for (convs of every kind,
BatchNorm, activations, pools, residual Add/Mul, Concat, Split/Slice, SE blocks, Resize, Pad,
Flatten/Reshape/Transpose heads, Reduce/Softmax/LayerNorm) and a few it has none for (Shrink,
CumSum, TopK, DepthToSpace, Tile, ...), each block picking its operand among earlier tensors, so
the graph is a DAG with skips and joins; about one model in eight is an MLP or a small
transformer block on (1, F) / (1, L, F) features instead. Weights come in exporter forms too
(``Constant`` nodes, fp16 behind ``Cast``, ``Identity``, folded ``Mul``/``Reshape``/``Transpose``,
shared initializers, shared int64 parameters). Every model passes the full onnx checker and runs
on onnxruntime CPU (``tests/test_fuzz.py`` checks both for many seeds).

The blocks of ``random_model(seed, max_blocks=k)`` are the first k blocks of ``random_model(seed,
max_blocks=k + 1)`` (the head is drawn from its own stream), so hypothesis can shrink the block
count towards a small model of the same seed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPSETS", "random_model"]

OPSETS = tuple(range(11, 22))
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class T:
    """A tensor of the graph under construction with its static shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def c(self) -> int:
        return self.shape[1]

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]


class _Gen:
    """Accumulates nodes and initializers; all randomness from one seeded generator."""

    def __init__(self, seed: int, opset: int | None, constants: bool | None,
                 dead_nodes: bool | None = None) -> None:
        self.dead_nodes = dead_nodes
        self.rng = np.random.default_rng(seed)
        self.head_rng = np.random.default_rng([seed, 1])  # independent of the block count
        self.opset = int(self.rng.choice(OPSETS)) if opset is None else opset
        self.constants = bool(self.rng.random() < 0.1) if constants is None else constants
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counter = 0
        self.pool: list[T] = []  # NCHW activations available as operands
        self.conv_outputs: list[T] = []
        self.conv_weights: dict[tuple[int, ...], list[str]] = {}
        self.int_params: dict[tuple, str] = {}
        self.shared: dict[tuple, str] = {}
        self.linear_weights: dict[tuple[int, ...], list[str]] = {}
        self.parts: list[T] = []  # Split/Slice outputs: partial channel sets for graph outputs

    # ---- primitives ----
    def uid(self, base: str) -> str:
        self.counter += 1  # a global counter: every node and constant name is unique
        return f"{base}_{self.counter}"

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def const(self, base: str, value, *, as_node: bool | None = None) -> str:
        """An initializer (or, paddle-style, a Constant node) holding ``value``."""
        name = self.uid(base)
        value = np.asarray(value)
        tensor = numpy_helper.from_array(value, name)
        if self.constants if as_node is None else as_node:
            attrs = {"value": tensor}
            if value.ndim == 1 and len(value) and self.opset >= 12 and self.chance(0.3):
                if value.dtype == np.float32:
                    attrs = {"value_floats": value.tolist()}
                elif value.dtype == np.int64:
                    attrs = {"value_ints": value.tolist()}
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                               **attrs))
        else:
            self.inits.append(tensor)
        return name

    def iconst(self, base: str, values) -> str:
        """An int64 parameter (axes, sizes, shape, pads); exporters often share equal ones."""
        value = np.asarray(values, dtype=np.int64)
        key = (value.shape, value.tobytes())
        if key in self.int_params and self.chance(0.3):
            return self.int_params[key]
        name = self.const(base, value, as_node=self.constants and self.chance(0.5))
        self.int_params[key] = name
        return name

    def floats(self, shape, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale + offset).astype(np.float32)

    def node(self, op: str, inputs: list[str], shapes: list[tuple[int, ...]], base: str = "",
             **attrs) -> list[T]:
        name = self.uid(base or op.lower())
        outs = [f"{name}_out" if len(shapes) == 1 else f"{name}_out{k}" for k in range(len(shapes))]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return [T(o, tuple(int(d) for d in s)) for o, s in zip(outs, shapes, strict=True)]

    def one(self, op: str, inputs: list[str], shape, base: str = "", **attrs) -> T:
        return self.node(op, inputs, [shape], base, **attrs)[0]

    def axes_input(self, node_inputs: list[str], axes, since: int, attrs: dict) -> None:
        """Axes as an attribute before opset ``since``, as a constant input from it on."""
        if self.opset >= since:
            node_inputs.append(self.iconst("axes", axes))
        else:
            attrs["axes"] = list(axes)

    # ---- layers ----
    def conv(self, x: T, cout: int | None = None, *, k: int | None = None,
             stride: int | None = None, conv_group: int = 1, same: bool = False,
             base: str = "conv") -> T:
        c, (h, w) = x.c, x.hw
        cout = cout or int(self.rng.integers(4, 17))
        if k is None:
            k = self.pick([1, 3, 3]) if min(h, w) >= 3 else 1
        if same:
            stride = 1
        elif stride is None:
            stride = 2 if min(h, w) >= 8 and self.chance(0.2) else 1
        pad = k // 2 if (same or k == 1 or min(h, w) < 6 or self.chance(0.8)) else 0
        attrs: dict = {"kernel_shape": [k, k]}
        if conv_group != 1:
            attrs["group"] = conv_group
        if stride != 1:
            attrs["strides"] = [stride, stride]
        pads = [pad, pad, pad, pad]
        if pad and self.chance(0.15):
            pads = [0, 0, 2 * pad, 2 * pad] if self.chance(0.5) else [2 * pad, 2 * pad, 0, 0]
        if any(pads) or self.chance(0.3):
            attrs["pads"] = pads
        fan_in = (c // conv_group) * k * k
        wshape = (cout, c // conv_group, k, k)
        shared = self.conv_weights.get(wshape, [])
        if shared and self.chance(0.1):
            wname = self.pick(shared)  # two convs share one weight initializer
        else:
            wname = self.weight(f"{base}_w", self.floats(wshape, 1 / np.sqrt(fan_in)))
            self.conv_weights.setdefault(wshape, []).append(wname)
        inputs = [x.name, wname]
        if self.chance(0.6):
            inputs.append(self.shared_param(f"{base}_b", cout, 0.0) if self.chance(0.15) else
                          self.const(f"{base}_b", self.floats(cout, 0.1)))
        if pads == [pad] * 4 and stride == 1 and k == 3 and self.chance(0.1):
            attrs.pop("pads", None)
            attrs["auto_pad"] = "SAME_UPPER" if pad else "VALID"
        elif pads == [1] * 4 and stride == 1 and k == 3 and min(h, w) >= 5 and self.chance(0.1):
            attrs["dilations"] = [2, 2]  # same size with pads 2
            attrs["pads"] = pads = [2] * 4
            k = 5  # the effective kernel, for the output size below
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        y = self.one("Conv", inputs, (1, cout, oh, ow), base, **attrs)
        self.conv_outputs.append(y)
        return y

    def weight(self, base: str, value: np.ndarray) -> str:
        """A weight, sometimes behind Identity or stored as float16 behind Cast (exporters)."""
        r = self.rng.random()
        if r < 0.05:
            stored = self.const(base, value)
            return self.one("Identity", [stored], value.shape, f"{base}_identity").name
        if r < 0.1:
            stored = self.const(base, value.astype(np.float16))
            return self.one("Cast", [stored], value.shape, f"{base}_cast",
                            to=TensorProto.FLOAT).name
        if r < 0.13:  # weight normalisation: W = V * g (per filter), folded by the engine
            g = (self.rng.random((len(value),) + (1,) * (value.ndim - 1)) + 0.5).astype(np.float32)
            v = self.const(f"{base}_v", (value / g).astype(np.float32))
            return self.one("Mul", [v, self.const(f"{base}_g", g)], value.shape,
                            f"{base}_norm").name
        if r < 0.15:  # stored flat, reshaped at run time
            flat = self.const(f"{base}_flat", value.reshape(-1))
            return self.one("Reshape", [flat, self.iconst("shape", list(value.shape))],
                            value.shape, f"{base}_reshape").name
        return self.const(base, value)

    def shared_param(self, base: str, n: int, fill: float) -> str:
        """A constant vector of ``fill`` shared by every layer of width ``n`` (deduplicated)."""
        key = (base.split("_")[-1], n, fill)
        if key not in self.shared:
            self.shared[key] = self.const(base, np.full(n, fill, np.float32))
        return self.shared[key]

    def bn(self, x: T) -> T:
        c = x.c
        if self.chance(0.2):  # a freshly initialised BN: exporters share its constants
            params = [self.shared_param("bn_ones", c, 1.0), self.shared_param("bn_zeros", c, 0.0),
                      self.shared_param("bn_zeros", c, 0.0), self.shared_param("bn_ones", c, 1.0)]
        else:
            params = [self.const("bn_scale", self.floats(c, 0.3, 1.0)),
                      self.const("bn_bias", self.floats(c, 0.1)),
                      self.const("bn_mean", self.floats(c, 0.1)),
                      self.const("bn_var", (self.rng.random(c) + 0.5).astype(np.float32))]
        return self.one("BatchNormalization", [x.name, *params], x.shape, "bn", epsilon=1e-5)

    def act(self, x: T) -> T:
        kinds = ["Relu", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "PRelu", "HardSigmoid",
                 "Elu", "Softplus", "Selu", "Celu", "Softsign", "Erf", "Abs", "Neg", "Sin"]
        # (no Floor/Round/Sign/ThresholdedRelu: a jump turns round-off into an O(1) error, and
        # no Sqrt/Log/Reciprocal: their slope at 0 amplifies it)
        if self.opset >= 14:
            kinds += ["HardSwish", "HardSwish"]
        if self.opset >= 18:
            kinds.append("Mish")
        if self.opset >= 20:
            kinds.append("Gelu")
        kind = self.pick(kinds)
        if kind == "LeakyRelu":
            return self.one(kind, [x.name], x.shape, alpha=0.1)
        if kind == "Celu" and self.opset < 12:
            kind = "Elu"
        if kind == "Clip":
            inputs = [x.name, self.const("clip_min", np.float32(0.0))]
            if self.chance(0.7):
                inputs.append(self.const("clip_max", np.float32(6.0)))
            return self.one(kind, inputs, x.shape)
        if kind == "PRelu":
            shape = self.pick([(x.c, 1, 1), (1,), (1, 1, 1)]) if len(x.shape) == 4 \
                else (x.shape[-1],)
            slope = (self.rng.random(shape) * 0.3).astype(np.float32)
            return self.one(kind, [x.name, self.const("prelu_slope", slope)], x.shape)
        return self.one(kind, [x.name], x.shape)

    def conv_unit(self, x: T, cout: int | None = None, **kw) -> T:
        """Conv [-> BN] [-> activation]."""
        y = self.conv(x, cout, **kw)
        if self.chance(0.5):
            y = self.bn(y)
        if self.chance(0.7):
            y = self.act(y)
        return y

    def branch(self, x: T, cout: int) -> T:
        """A short path from ``x`` to ``cout`` channels (spatial size kept)."""
        r = self.rng.random()
        if r < 0.15 and cout == x.c:
            return self.depthwise(x, multiplier=1, same=True)
        if r < 0.3:
            mid = self.conv_unit(x, int(self.rng.integers(4, 17)), same=True)
            return self.conv_unit(mid, cout, same=True)
        return self.conv_unit(x, cout, same=True)

    # ---- blocks: NCHW x -> NCHW y ----
    def b_conv(self, x: T) -> T:
        return self.conv_unit(x)

    def depthwise(self, x: T, multiplier: int | None = None, same: bool = False) -> T:
        mult = multiplier or (2 if self.chance(0.1) and x.c <= 8 else 1)
        y = self.conv(x, x.c * mult, k=3, stride=1, conv_group=x.c, same=same, base="dwconv")
        if self.chance(0.5):
            y = self.bn(y)
        return self.act(y) if self.chance(0.6) else y

    def b_grouped(self, x: T) -> T:
        groups = [g for g in (2, 4) if x.c % g == 0]
        if not groups:
            return self.b_conv(x)
        g = self.pick(groups)
        return self.conv_unit(x, g * int(self.rng.integers(2, 5)), conv_group=g)

    def b_convtranspose(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        r = self.rng.random()
        if r < 0.2:
            conv_group, cout = c, c  # depthwise
        elif r < 0.3 and c % 2 == 0:
            conv_group, cout = 2, 2 * int(self.rng.integers(2, 7))
        else:
            conv_group, cout = 1, int(self.rng.integers(4, 17))
        out_pad = 0
        if max(h, w) <= 8 and self.chance(0.6):
            k, stride, pad = 2, 2, 0
        elif max(h, w) <= 8 and self.chance(0.3):
            k, stride, pad, out_pad = 3, 2, 1, 1
        else:
            k, stride, pad = 3, 1, 1
        wname = self.const("convt_w", self.floats((c, cout // conv_group, k, k), 1 / np.sqrt(c)))
        inputs = [x.name, wname]
        if self.chance(0.5):
            inputs.append(self.const("convt_b", self.floats(cout, 0.1)))
        attrs: dict = {"kernel_shape": [k, k], "strides": [stride, stride],
                       "pads": [pad] * 4}
        if out_pad:
            attrs["output_padding"] = [out_pad, out_pad]
        if conv_group != 1:
            attrs["group"] = conv_group
        oh = (h - 1) * stride - 2 * pad + k + out_pad
        ow = (w - 1) * stride - 2 * pad + k + out_pad
        y = self.one("ConvTranspose", inputs, (1, cout, oh, ow), "convt", **attrs)
        self.conv_outputs.append(y)
        return self.act(y) if self.chance(0.5) else y

    def b_bn_act(self, x: T) -> T:
        return self.act(self.bn(x)) if self.chance(0.5) else self.act(x)

    def b_pool(self, x: T) -> T:
        if x.name.startswith("pad_"):  # onnxruntime's Pad->Pool fusion can exceed the kernel
            x = self.act(x)
        c, (h, w) = x.c, x.hw
        op = self.pick(["MaxPool", "AveragePool", "MaxPool", "AveragePool", "LpPool"])
        if min(h, w) >= 4 and self.chance(0.5):
            return self.one(op, [x.name], (1, c, h // 2, w // 2), kernel_shape=[2, 2],
                            strides=[2, 2])
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
        if op == "AveragePool" and self.chance(0.5):
            attrs["count_include_pad"] = 1
        return self.one(op, [x.name], (1, c, h, w), **attrs)

    def b_gap(self, x: T) -> T:
        op = self.pick(["GlobalAveragePool"] * 6 + ["GlobalMaxPool", "GlobalLpPool"])
        return self.one(op, [x.name], (1, x.c, 1, 1), "gap")

    def partner(self, x: T) -> T:
        """Another tensor of x's shape: an earlier one, or a new branch from x."""
        same = [t for t in self.pool if t.shape == x.shape and t.name != x.name]
        if same and self.chance(0.4):
            return self.pick(same)
        return self.branch(x, x.c)

    def b_residual(self, x: T) -> T:
        op = self.pick(["Add", "Add", "Add", "Mul", "Sub", "Max", "Where", "Sum", "Mean"])
        y = self.partner(x)
        if op == "Where":  # max(x, y) written as Where(Greater(x, y), x, y): a bool map too
            cond = self.one(self.pick(["Greater", "Less"]), [x.name, y.name], x.shape, "cmp")
            return self.one("Where", [cond.name, x.name, y.name], x.shape, "select")
        if op in ("Sum", "Mean"):
            z = self.partner(x)
            return self.one(op, [x.name, y.name, z.name], x.shape, "res")
        inputs = [x.name, y.name] if self.chance(0.5) else [y.name, x.name]
        out = self.one(op, inputs, x.shape, "res")
        return self.act(out) if self.chance(0.4) else out

    def b_concat_channels(self, x: T) -> T:
        parts = [x if self.chance(0.4) else self.branch(x, int(self.rng.integers(4, 13)))]
        for _ in range(int(self.rng.integers(1, 3))):
            same_hw = [t for t in self.pool if t.hw == x.hw and t.c <= 16 and t not in parts]
            if same_hw and self.chance(0.3):
                parts.append(self.pick(same_hw))
            else:
                parts.append(self.branch(x, int(self.rng.integers(4, 13))))
        if self.chance(0.1):  # constant channels (coordinates, a learned map): not ours
            k = int(self.rng.integers(1, 4))
            parts.append(T(self.const("const_channels", self.floats((1, k, *x.hw))), (1, k, *x.hw)))
        self.rng.shuffle(parts)
        total = sum(p.c for p in parts)
        axis = self.pick([1, 1, -3])
        y = self.one("Concat", [p.name for p in parts], (1, total, *x.hw), "concat", axis=axis)
        if total > 16 or self.chance(0.5):
            y = self.conv_unit(y, int(self.rng.integers(4, 17)), stride=1)
        return y

    def b_concat_spatial(self, x: T) -> T:
        if max(x.hw) > 8:
            return self.b_residual(x)
        y = self.partner(x)
        axis = self.pick([2, 3, -1])
        shape = list(x.shape)
        shape[axis] *= 2
        parts = [x.name, y.name] if self.chance(0.5) else [y.name, x.name]
        return self.one("Concat", parts, tuple(shape), "concat", axis=axis)

    def split_node(self, x: T, axis: int, sizes: list[int]) -> list[T]:
        parts = self._split_node(x, axis, sizes)
        self.parts.extend(parts)
        return parts

    def _split_node(self, x: T, axis: int, sizes: list[int]) -> list[T]:
        shapes = []
        for s in sizes:
            shape = list(x.shape)
            shape[axis] = s
            shapes.append(tuple(shape))
        inputs, attrs = [x.name], {"axis": axis if self.chance(0.8) else axis - len(x.shape)}
        equal = len(set(sizes)) == 1
        if self.opset >= 18 and self.chance(0.4):
            ceil = -(-x.shape[axis] // len(sizes))
            if sizes == [ceil] * (len(sizes) - 1) + [x.shape[axis] - ceil * (len(sizes) - 1)]:
                attrs["num_outputs"] = len(sizes)
                return self.node("Split", inputs, shapes, "split", **attrs)
        if equal and self.opset < 18 and self.chance(0.3):
            return self.node("Split", inputs, shapes, "split", **attrs)
        if self.opset < 13:
            attrs["split"] = sizes
        else:
            inputs.append(self.iconst("split_sizes", sizes))
        return self.node("Split", inputs, shapes, "split", **attrs)

    def b_split_channels(self, x: T) -> T:
        c = x.c
        if c < 2:
            return self.b_conv(x)
        n = 1 if self.chance(0.05) else int(self.rng.integers(2, min(3, c) + 1))
        if self.opset >= 18 and self.chance(0.4):
            ceil = -(-c // n)
            sizes = [ceil] * (n - 1) + [c - ceil * (n - 1)]
            if sizes[-1] <= 0:
                sizes = [c // 2, c - c // 2]
        else:
            cuts = sorted(self.rng.choice(np.arange(1, c), n - 1, replace=False).tolist())
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, c], strict=True)]
        parts = self.split_node(x, 1, sizes)
        processed = []
        for p in parts:
            r = self.rng.random()
            if r < 0.3:
                processed.append(p)
            elif r < 0.5:
                processed.append(self.act(p))
            elif r < 0.9:
                processed.append(self.conv_unit(p, same=True))
            # else: the part is dropped (its Split output stays unused)
        if not processed:
            processed.append(parts[0])
        if len(processed) >= 2 and processed[0].shape == processed[1].shape and self.chance(0.4):
            y = self.one("Add", [processed[0].name, processed[1].name], processed[0].shape, "res")
            processed = [y, *processed[2:]]
        if len(processed) == 1:
            return processed[0]
        self.rng.shuffle(processed)
        total = sum(p.c for p in processed)
        y = self.one("Concat", [p.name for p in processed], (1, total, *x.hw), "concat", axis=1)
        return self.conv_unit(y, stride=1) if total > 16 else y

    def b_split_spatial(self, x: T) -> T:
        h, w = x.hw
        axis = 2 if h % 2 == 0 and h >= 2 else 3 if w % 2 == 0 and w >= 2 else None
        if axis is None:
            return self.b_conv(x)
        half = x.shape[axis] // 2
        a, b = self.split_node(x, axis, [half, half])
        if self.chance(0.5):
            return self.one(self.pick(["Add", "Mul"]), [a.name, b.name], a.shape, "res")
        b2 = self.conv_unit(b, x.c, k=1, stride=1) if self.chance(0.5) else b
        return self.one("Concat", [b2.name, a.name], x.shape, "concat", axis=axis)

    def slice_node(self, x: T, axis: int, start: int, stop: int, extra_spatial: bool) -> T:
        dim = x.shape[axis]
        end = stop
        if stop == dim and self.chance(0.5):
            end = self.pick([INT64_MAX, dim + 5, 2**31 - 1])
        elif self.chance(0.3):
            end = stop - dim  # negative end
            if end == 0:
                end = stop
        begin = start - dim if start and self.chance(0.2) else start
        starts, ends, axes = [begin], [end], [axis if self.chance(0.7) else axis - 4]
        shape = list(x.shape)
        shape[axis] = stop - start
        if extra_spatial and x.shape[3] >= 4:
            starts.append(1)
            ends.append(x.shape[3])
            axes.append(3)
            shape[3] = x.shape[3] - 1
        if self.rng.random() < 0.5:
            axes_order = list(range(len(axes)))[::-1]
            starts = [starts[i] for i in axes_order]
            ends = [ends[i] for i in axes_order]
            axes = [axes[i] for i in axes_order]
        inputs = [x.name, self.iconst("starts", starts),
                  self.iconst("ends", ends)]
        if self.chance(0.8):
            inputs.append(self.iconst("axes", axes))
            if self.chance(0.4):
                inputs.append(self.iconst("steps", [1] * len(axes)))
        else:  # no axes input: starts/ends apply to axes 0, 1, ...
            pad_n = max(axes) + 1 if min(axes) >= 0 else 4
            full_s = [0] * pad_n
            full_e = [INT64_MAX] * pad_n
            for s_, e_, a_ in zip(starts, ends, axes, strict=True):
                full_s[a_ % 4], full_e[a_ % 4] = s_, e_
            inputs[1] = self.iconst("starts", full_s)
            inputs[2] = self.iconst("ends", full_e)
        y = self.one("Slice", inputs, tuple(shape), "slice")
        self.parts.append(y)
        return y

    def b_slice_channels(self, x: T) -> T:
        c = x.c
        if c < 3:
            return self.b_conv(x)
        start = int(self.rng.integers(0, c - 1))
        stop = int(self.rng.integers(start + 1, c + 1))
        if (start, stop) == (0, c):
            stop = c - 1
        y = self.slice_node(x, 1, start, stop, extra_spatial=self.chance(0.2))
        if self.chance(0.4) and y.hw == x.hw:  # partial residual
            z = self.conv_unit(x, y.c, same=True)
            return self.one("Add", [y.name, z.name], y.shape, "res")
        if y.c < 4 or self.chance(0.5):
            return self.conv_unit(y, stride=1)
        return y

    def b_overlap(self, x: T) -> T:
        """Two overlapping channel windows of one tensor added: position i couples i + shift."""
        c = x.c
        if c < 3:
            return self.b_conv(x)
        k = int(self.rng.integers(1, c))
        a0, b0 = (int(v) for v in self.rng.integers(0, c - k + 1, 2))
        a = self.slice_node(x, 1, a0, a0 + k, extra_spatial=False)
        b = self.slice_node(x, 1, b0, b0 + k, extra_spatial=False)
        y = self.one(self.pick(["Add", "Mul", "Max"]), [a.name, b.name], a.shape, "res")
        return self.conv_unit(y, same=True)

    def b_transpose_mid(self, x: T) -> T:
        """Channels moved to axis 2 ([0, 2, 1, 3]); ops on the last axis act beside them."""
        c, (h, w) = x.c, x.hw
        if self.chance(0.25):  # no perm: all axes reversed, there and back
            y = self.one("Transpose", [x.name], (w, h, c, 1), "transpose")
            y = self.act(y) if self.chance(0.5) else y
            return self.one("Transpose", [y.name], x.shape, "transpose")
        y = self.one("Transpose", [x.name], (1, h, c, w), "transpose", perm=[0, 2, 1, 3])
        kind = self.pick(["matmul", "softmax", "relu"])
        if kind == "matmul":
            y = self.linear(y, int(self.rng.integers(2, 9)))
        elif kind == "softmax" and self.opset >= 13:
            y = self.one("Softmax", [y.name], y.shape, axis=-1)
        else:
            y = self.act(y)
        return self.one("Transpose", [y.name], (1, c, h, y.shape[3]), "transpose",
                        perm=[0, 2, 1, 3])

    def b_conv1d(self, x: T) -> T:
        """A 1-D section: (1, C, H, W) -> (1, C, H*W) -> Conv1d [-> BN] -> back to 4-D."""
        c, (h, w) = x.c, x.hw
        y = self.reshape(x, self.pick([[1, c, h * w], [0, 0, -1], [1, c, -1]]), (1, c, h * w))
        cout = int(self.rng.integers(4, 17))
        inputs = [y.name, self.weight("conv1d_w", self.floats((cout, c, 3), 1 / np.sqrt(3 * c)))]
        if self.chance(0.5):
            inputs.append(self.const("conv1d_b", self.floats(cout, 0.1)))
        y = self.one("Conv", inputs, (1, cout, h * w), "conv1d", kernel_shape=[3], pads=[1, 1])
        if self.chance(0.5):
            y = self.bn(y)
        if self.chance(0.3):
            y = self.one("MaxPool", [y.name], y.shape, kernel_shape=[3], pads=[1, 1])
        y = self.act(y) if self.chance(0.5) else y
        return self.reshape(y, self.pick([[1, cout, h, w], [0, -1, h, w], [0, 0, h, w]]),
                            (1, cout, h, w))

    def b_se(self, x: T) -> T:
        c = x.c
        if self.chance(0.6):
            s = self.b_gap(x)
        else:
            inputs, attrs = [x.name], {"keepdims": 1}
            self.axes_input(inputs, [2, 3], 18, attrs)
            s = self.one("ReduceMean", inputs, (1, c, 1, 1), "squeeze", **attrs)
        r = max(2, c // 4)
        s = self.conv(s, r, k=1, stride=1, base="se_reduce")
        s = self.one(self.pick(["Relu", "Relu", "Sigmoid"]), [s.name], s.shape)
        s = self.conv(s, c, k=1, stride=1, base="se_expand")
        s = self.one(self.pick(["Sigmoid", "HardSigmoid"]), [s.name], s.shape, "gate")
        inputs = [x.name, s.name] if self.chance(0.5) else [s.name, x.name]
        return self.one("Mul", inputs, x.shape, "scale")

    def b_resize(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        factor = 2.0 if max(h, w) <= 8 else 0.5 if min(h, w) >= 8 and h % 2 == 0 and w % 2 == 0 \
            else 1.0
        oh, ow = int(h * factor), int(w * factor)
        mode = self.pick(["nearest", "nearest", "linear"])
        empty = ""
        if self.opset < 13:
            empty = self.const("roi", np.zeros(0, np.float32), as_node=False)
        attrs: dict = {"mode": mode}
        use_axes = self.opset >= 18 and self.chance(0.4)
        full_scales, full_sizes = [1.0, 1.0, factor, factor], [1, c, oh, ow]
        if use_axes:  # a subset of axes, in any order, possibly counted from the back
            axes = self.pick([[2, 3], [-2, -1], [3, 2], [1, 2, 3], [-3, -2, -1], [-1, 1, 2]])
            attrs["axes"] = axes
            full_scales = [full_scales[a] for a in axes]
            full_sizes = [full_sizes[a] for a in axes]
        if self.chance(0.5):
            scales = full_scales
            inputs = [x.name, empty, self.const("scales", np.array(scales, np.float32),
                                                as_node=False)]
        else:
            sizes = full_sizes
            empty_scales = self.const("scales", np.zeros(0, np.float32), as_node=False) \
                if self.opset < 13 else ""
            sizes_name = self.iconst("sizes", sizes)
            if not use_axes and self.chance(0.3):  # F.interpolate(size=...): x.shape[:2] + size
                shape = self.one("Shape", [x.name], (4,), "shape")
                head = self.one("Slice", [shape.name, self.iconst("zero", [0]),
                                          self.iconst("two", [2])], (2,), "slice")
                sizes_name = self.one("Concat", [head.name, self.iconst("size", [oh, ow])], (4,),
                                      "concat", axis=0).name
            inputs = [x.name, empty, empty_scales, sizes_name]
        return self.one("Resize", inputs, (1, c, oh, ow), "resize", **attrs)

    def b_pad(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        if max(h, w) > 16:
            return self.b_pool(x)
        mode = self.pick(["constant", "constant", "reflect", "edge"])
        limit = 2 if mode != "reflect" else min(2, h - 1, w - 1)
        if limit < 1:
            mode, limit = "constant", 2
        p = [int(v) for v in self.rng.integers(0, limit + 1, 4)]
        if not any(p):
            p[0] = 1
        attrs = {"mode": mode}
        if self.opset >= 18 and self.chance(0.4):
            pads = [p[0], p[1], p[2], p[3]]
            axes: list[int] | None = [2, 3] if self.chance(0.5) else [-2, -1]
        else:
            pads = [0, 0, p[0], p[1], 0, 0, p[2], p[3]]
            axes = None
        inputs = [x.name, self.iconst("pads", pads)]
        if mode == "constant" and self.chance(0.5):
            inputs.append(self.const("pad_value", np.float32(self.rng.standard_normal()),
                                     as_node=False))
        if axes is not None:
            if len(inputs) == 2:
                inputs.append("")
            inputs.append(self.iconst("axes", axes))
        return self.one("Pad", inputs, (1, c, h + p[0] + p[2], w + p[1] + p[3]), "pad", **attrs)

    def reshape(self, x: T, spec: list[int], shape: tuple[int, ...]) -> T:
        return self.one("Reshape", [x.name, self.iconst("shape", spec)],
                        shape, "reshape")

    def b_shuffle(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        if c % 2:
            return self.b_conv(x)
        g = 2
        y = self.reshape(x, self.pick([[1, g, c // g, h, w], [0, g, -1, h, w]]),
                         (1, g, c // g, h, w))
        y = self.one("Transpose", [y.name], (1, c // g, g, h, w), perm=[0, 2, 1, 3, 4])
        return self.reshape(y, self.pick([[1, c, h, w], [1, -1, h, w]]), x.shape)

    def b_reshape_roundtrip(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        y = self.reshape(x, self.pick([[1, c, h * w], [0, 0, -1], [1, c, -1]]), (1, c, h * w))
        if self.chance(0.5):
            op = self.pick(["Softmax", "Relu", "Hardmax"]) if self.opset >= 13 else "Relu"
            y = self.one(op, [y.name], y.shape, **({"axis": -1} if op != "Relu" else {}))
        return self.reshape(y, self.pick([[1, c, h, w], [0, 0, h, w], [0, -1, h, w]]), x.shape)

    def b_nhwc(self, x: T) -> T:
        """Channels-last section: Transpose to NHWC, 1-3 ops on the last axis, and back."""
        c, (h, w) = x.c, x.hw
        y = self.one("Transpose", [x.name], (1, h, w, c), "to_nhwc", perm=[0, 2, 3, 1])
        for _ in range(int(self.rng.integers(1, 4))):
            y = self.nhwc_op(x, y)
        return self.one("Transpose", [y.name], (1, y.shape[3], y.shape[1], y.shape[2]),
                        "to_nchw", perm=[0, 3, 1, 2])

    def nhwc_op(self, x: T, y: T) -> T:
        c, (h, w) = y.shape[3], y.shape[1:3]
        kinds = ["relu", "scale", "bias", "softmax", "matmul", "matmul", "matmul4d", "concat",
                 "split", "residual", "resize", "pad", "reduce"]
        if self.opset >= 17:
            kinds.append("layernorm")
        kind = self.pick(kinds)
        if kind == "relu":
            return self.act(y)
        if kind == "scale":
            return self.one("Mul", [y.name, self.const("nhwc_scale", self.floats(c, 0.3, 1.0))],
                            y.shape, "scale")
        if kind == "bias":
            return self.one("Add", [y.name, self.const("nhwc_bias", self.floats(c, 0.1))],
                            y.shape, "bias")
        if kind == "softmax":
            return self.one("Softmax", [y.name], y.shape, axis=self.pick([-1, 3, 2]))
        if kind == "layernorm":
            return self.one("LayerNormalization",
                            [y.name, self.const("ln_scale", self.floats(c, 0.1, 1.0)),
                             self.const("ln_bias", self.floats(c, 0.1))], y.shape, "ln", axis=-1)
        if kind == "matmul4d":
            return self.linear(y, int(self.rng.integers(4, 17)))
        if kind == "resize" and max(h, w) <= 8:
            if self.chance(0.5):
                scales = self.const("scales", np.array([1, 2, 2, 1], np.float32), as_node=False)
                inputs = [y.name, "", scales]
            else:
                inputs = [y.name, "", "", self.iconst("sizes", [1, 2 * h, 2 * w, c])]
            if self.opset < 13:
                roi = self.const("roi", np.zeros(0, np.float32), as_node=False)
                empty = self.const("scales", np.zeros(0, np.float32), as_node=False)
                inputs = [inputs[0], roi, inputs[2] or empty, *inputs[3:]]
            return self.one("Resize", inputs, (1, 2 * h, 2 * w, c), "resize", mode="nearest")
        if kind == "pad" and max(h, w) <= 14:
            inputs = [y.name, self.iconst("pads", [0, 1, 0, 0, 0, 0, 1, 0])]
            return self.one("Pad", inputs, (1, h + 1, w + 1, c), "pad")
        if kind == "reduce":
            inputs, attrs = [y.name], {"keepdims": 1}
            self.axes_input(inputs, [1], 18, attrs)
            s_ = self.one("ReduceMean", inputs, (1, 1, w, c), "reduce_s", **attrs)
            return self.one("Add", [y.name, s_.name], y.shape, "res")
        if kind in ("concat", "residual", "resize", "pad"):
            if x.hw != (h, w) or kind in ("resize", "pad"):
                return self.act(y)
            b = self.branch(x, c if kind == "residual" else int(self.rng.integers(4, 9)))
            other = self.one("Transpose", [b.name], (1, h, w, b.c), "to_nhwc", perm=[0, 2, 3, 1])
            if kind == "residual":
                return self.one("Add", [y.name, other.name], y.shape, "res")
            parts = [y, other] if self.chance(0.5) else [other, y]
            return self.one("Concat", [p.name for p in parts],
                            (1, h, w, parts[0].shape[3] + parts[1].shape[3]), "concat",
                            axis=self.pick([3, -1]))
        if kind == "split":
            if c < 2:
                return self.act(y)
            k = int(self.rng.integers(1, c))
            a, b = self.split_node(y, 3, [k, c - k])
            if self.chance(0.5):
                b = self.act(b)
            return self.one("Concat", [b.name, a.name], y.shape, "concat", axis=-1)
        f = int(self.rng.integers(4, 17))
        seq = self.reshape(y, [1, h * w, c], (1, h * w, c))
        seq = self.linear(seq, f)
        seq = self.act(seq) if self.chance(0.5) else seq
        return self.reshape(seq, self.pick([[1, h, w, f], [0, h, w, -1]]), (1, h, w, f))

    def b_affine(self, x: T) -> T:
        """Element-wise op with a constant: per-channel, scalar, spatial or full-shape operand."""
        c, (h, w) = x.c, x.hw
        shape = self.pick([(c, 1, 1), (1, c, 1, 1), (), (1,), (w,), (1, 1, h, w), (c, h, w),
                           (1, c, h, w), (c, 1, w)])
        op = self.pick(["Mul", "Mul", "Add", "Add", "Sub", "Div", "Max", "Pow"])
        if op == "Div":  # a positive constant divisor, never the activation
            inputs = [x.name, self.const("div", (self.rng.random(shape) + 0.5).astype(np.float32))]
        elif op == "Pow":  # integer exponents: defined for negative bases
            inputs = [x.name, self.const("exponent",
                                         self.rng.integers(1, 3, shape).astype(np.float32))]
        else:
            name = self.const(f"{op.lower()}_const",
                              self.floats(shape, 0.3, 1.0 if op == "Mul" else 0.0))
            inputs = [x.name, name] if self.chance(0.7) else [name, x.name]
        return self.one(op, inputs, x.shape, "affine")

    def b_permute(self, x: T) -> T:
        """Channels joined with a permutation of themselves: Split -> Concat swapped -> Add x."""
        c = x.c
        if c < 2:
            return self.b_conv(x)
        if self.chance(0.3):
            y = self.one("Concat", [x.name, x.name], (1, 2 * c, *x.hw), "concat", axis=1)
            return self.conv_unit(y, same=True)
        k = int(self.rng.integers(1, c))
        a, b = self.split_node(x, 1, [k, c - k])
        y = self.one("Concat", [b.name, a.name], x.shape, "concat", axis=1)
        return self.one(self.pick(["Add", "Mul"]), [x.name, y.name], x.shape, "res")

    def b_se_fc(self, x: T) -> T:
        """SE block with fully connected layers (Gemm/MatMul) and a 2-D detour."""
        c = x.c
        s = self.b_gap(x)
        form = self.pick(["flatten", "squeeze", "squeeze_all", "reshape"])
        if form == "squeeze_all" and c == 1:
            form = "squeeze"
        if form == "flatten":
            v = self.one("Flatten", [s.name], (1, c), "flatten", axis=1)
        elif form == "squeeze":
            inputs, attrs = [s.name], {}
            self.axes_input(inputs, [2, 3], 13, attrs)
            v = self.one("Squeeze", inputs, (1, c), "squeeze", **attrs)
        elif form == "squeeze_all":  # drops the batch axis too: channels on axis 0
            v = self.one("Squeeze", [s.name], (c,), "squeeze")
            inputs, attrs = [v.name], {}
            self.axes_input(inputs, [0], 13, attrs)
            v = self.one("Unsqueeze", inputs, (1, c), "unsqueeze", **attrs)
        else:
            v = self.reshape(s, self.pick([[1, c], [1, -1], [0, -1]]), (1, c))
        v = self.act(self.linear(v, max(2, c // 4)))
        v = self.linear(v, c)
        v = self.one(self.pick(["Sigmoid", "HardSigmoid"]), [v.name], v.shape, "gate")
        if self.chance(0.5):
            inputs, attrs = [v.name], {}
            self.axes_input(inputs, [2, 3], 13, attrs)
            g = self.one("Unsqueeze", inputs, (1, c, 1, 1), "unsqueeze", **attrs)
        else:
            g = self.reshape(v, self.pick([[1, c, 1, 1], [0, -1, 1, 1], [1, -1, 1, 1]]),
                             (1, c, 1, 1))
        inputs = [x.name, g.name] if self.chance(0.5) else [g.name, x.name]
        return self.one("Mul", inputs, x.shape, "scale")

    def b_gather(self, x: T) -> T:
        c, (h, w) = x.c, x.hw
        kind = self.pick(["spatial", "spatial", "scalar", "channel", "batch"])
        if kind == "scalar":  # drops the H axis, then puts it back
            i = int(self.rng.integers(h))
            index = self.iconst("index", i - h if self.chance(0.3) else i)
            y = self.one("Gather", [x.name, index], (1, c, w), "gather", axis=2)
            inputs, attrs = [y.name], {}
            self.axes_input(inputs, [2], 13, attrs)
            return self.one("Unsqueeze", inputs, (1, c, 1, w), "unsqueeze", **attrs)
        axis = {"spatial": self.pick([2, 3, -1]), "channel": 1, "batch": 0}[kind]
        dim = x.shape[axis]
        picked = self.rng.permutation(dim)[: int(self.rng.integers(1, dim + 1))]
        if kind == "batch":
            picked = np.zeros(1, np.int64)
        shape = list(x.shape)
        shape[axis] = len(picked)
        y = self.one("Gather", [x.name, self.iconst("indices", picked)], tuple(shape), "gather",
                     axis=axis)
        return self.conv_unit(y) if y.c < 4 else y

    def b_chunk(self, x: T) -> T:
        """TorchScript ``chunk(2, dim=1)``: Shape -> Gather -> Div -> Slice bounds (or sizes)."""
        c = x.c
        if c % 2 or c < 2:
            return self.b_conv(x)
        shape = self.one("Shape", [x.name], (4,), "shape")
        count = self.one("Gather", [shape.name, self.iconst("index", 1)], (), "gather", axis=0)
        half = self.one("Div", [count.name, self.iconst("two", 2)], (), "div")
        inputs, attrs = [half.name], {}
        self.axes_input(inputs, [0], 13, attrs)
        half = self.one("Unsqueeze", inputs, (1,), "unsqueeze", **attrs)
        if self.opset >= 13 and self.chance(0.4):  # Split with computed sizes
            sizes = self.one("Concat", [half.name, half.name], (2,), "concat", axis=0)
            a, b = self.node("Split", [x.name, sizes.name], [(1, c // 2, *x.hw)] * 2, "split",
                             axis=1)
        else:
            end = self.one("Mul", [half.name, self.iconst("two", [2])], (1,), "mul")
            axes = self.iconst("axes", [1])
            a = self.one("Slice", [x.name, self.iconst("zero", [0]), half.name, axes],
                         (1, c // 2, *x.hw), "slice")
            b = self.one("Slice", [x.name, half.name, end.name, axes], (1, c // 2, *x.hw),
                         "slice")
        if self.chance(0.5):
            return self.one(self.pick(["Add", "Mul"]), [self.act(a).name, b.name], a.shape,
                            "res")
        return self.one("Concat", [b.name, a.name], x.shape, "concat", axis=1)

    def b_slice_spatial(self, x: T) -> T:
        """Slices of H/W with steps 2 or -1 (channels pass)."""
        axis = self.pick([2, 3])
        dim = x.shape[axis]
        if self.chance(0.5):
            starts, ends, steps, size = [0], [dim], [2], -(-dim // 2)
        else:
            starts, ends, steps, size = [-1], [-INT64_MAX], [-1], dim
        shape = list(x.shape)
        shape[axis] = size
        inputs = [x.name, self.iconst("starts", starts), self.iconst("ends", ends),
                  self.iconst("axes", [axis]), self.iconst("steps", steps)]
        return self.one("Slice", inputs, tuple(shape), "slice")

    def b_reduce_channels(self, x: T) -> T:
        """Spatial attention: ReduceMean/Max over channels -> Sigmoid -> broadcast Mul."""
        inputs, attrs = [x.name], {"keepdims": 1}
        self.axes_input(inputs, [1], 18, attrs)
        s = self.one(self.pick(["ReduceMean", "ReduceMax"]), inputs, (1, 1, *x.hw), "reduce_c",
                     **attrs)
        if self.chance(0.3):
            return self.conv_unit(s, stride=1)
        s = self.one("Sigmoid", [s.name], s.shape, "gate")
        return self.one("Mul", [x.name, s.name], x.shape, "scale")

    def b_reduce_spatial(self, x: T) -> T:
        inputs, attrs = [x.name], {"keepdims": 1}
        axes = self.pick([[2, 3], [-1, -2], [3]])
        self.axes_input(inputs, axes, 18, attrs)
        shape = list(x.shape)
        for a in axes:
            shape[a] = 1
        s = self.one("ReduceMean", inputs, tuple(shape), "reduce_s", **attrs)
        # (no Sub: x - mean(x) followed by a global pool is zero, and the oracle's relative
        # error of pure round-off is meaningless)
        return self.one(self.pick(["Add", "Mul"]), [x.name, s.name], x.shape, "res")

    def b_softmax(self, x: T) -> T:
        op = self.pick(["Softmax", "Softmax", "LogSoftmax", "Hardmax"])
        axis = self.pick([1, -1, 3, 2, -3])
        return self.one(op, [x.name], x.shape, axis=axis)

    def b_layernorm(self, x: T) -> T:
        if self.opset < 17:
            return self.b_instancenorm(x)
        axis = self.pick([-1, 1, 2, 3])
        norm_shape = x.shape[axis:]
        inputs = [x.name, self.const("ln_scale", self.floats(norm_shape, 0.1, 1.0))]
        if self.chance(0.6):
            inputs.append(self.const("ln_bias", self.floats(norm_shape, 0.1)))
        return self.one("LayerNormalization", inputs, x.shape, "ln", axis=axis)

    def b_instancenorm(self, x: T) -> T:
        inputs = [x.name, self.const("in_scale", self.floats(x.c, 0.1, 1.0)),
                  self.const("in_bias", self.floats(x.c, 0.1))]
        return self.one("InstanceNormalization", inputs, x.shape, "instnorm")

    def b_channel_mixing(self, x: T) -> T:
        """Handlers that block: LRN, LpNormalization, GroupNormalization."""
        # (MeanVarianceNormalization is left out: onnx 1.23's full check fails on its body.)
        kinds = ["LRN", "LpNormalization"]
        if self.opset >= 21 and x.c % 2 == 0:
            kinds.append("GroupNormalization")
        kind = self.pick(kinds)
        if kind == "LRN":
            return self.one(kind, [x.name], x.shape, size=3)
        if kind == "GroupNormalization":
            inputs = [x.name, self.const("gn_scale", self.floats(x.c, 0.1, 1.0)),
                      self.const("gn_bias", self.floats(x.c, 0.1))]
            return self.one(kind, inputs, x.shape, "groupnorm", num_groups=2)
        return self.one(kind, [x.name], x.shape, "lpnorm", axis=1, p=2)

    def b_unknown(self, x: T) -> T:
        """Ops without a handler (onnxruntime CPU runs all of them)."""
        c, (h, w) = x.c, x.hw
        kinds = ["Shrink", "CumSum", "TopK", "Tile", "Expand"]
        if self.opset >= 12:
            kinds.append("Einsum")
        if c % 4 == 0:
            kinds.append("DepthToSpace")
        if h % 2 == 0 and w % 2 == 0 and c <= 4:
            kinds.append("SpaceToDepth")
        kind = self.pick(kinds)
        if kind == "Shrink":
            return self.one(kind, [x.name], x.shape, lambd=0.2, bias=0.1)
        if kind == "CumSum":
            axis = self.const("cumsum_axis", np.int64(self.pick([2, 3, 1])), as_node=False)
            return self.one(kind, [x.name, axis], x.shape)
        if kind == "TopK":
            k = self.iconst("topk_k", [w])
            values, _ = self.node("TopK", [x.name, k], [x.shape, x.shape], "topk", axis=-1)
            return values  # the indices output stays unused
        if kind == "Tile":
            reps = [1, 1, 2, 1] if h <= 8 else [1, 1, 1, 1]
            return self.one(kind, [x.name, self.iconst("repeats", reps)],
                            (1, c, h * reps[2], w), "tile")
        if kind == "Einsum":
            return self.one(kind, [x.name], x.shape, "einsum", equation="nchw->nchw")
        if kind == "Expand":
            return self.one(kind, [x.name, self.iconst("expand_shape", [1, 1, 1, 1])], x.shape,
                            "expand")
        if kind == "DepthToSpace":
            return self.one(kind, [x.name], (1, c // 4, h * 2, w * 2), "d2s", blocksize=2)
        return self.one(kind, [x.name], (1, c * 4, h // 2, w // 2), "s2d", blocksize=2)

    def b_dropout_identity(self, x: T) -> T:
        kind = self.pick(["Identity", "Dropout", "Cast", "CastLike"])
        if kind == "Cast":
            return self.one("Cast", [x.name], x.shape, "cast", to=TensorProto.FLOAT)
        if kind == "CastLike":
            if self.opset < 15:
                return self.one("Identity", [x.name], x.shape)
            like = x.name if self.chance(0.5) else self.const("like", np.zeros(1, np.float32))
            return self.one("CastLike", [x.name, like], x.shape, "castlike")
        if kind == "Dropout" and self.opset >= 12 and self.chance(0.5):
            ratio = self.const("ratio", np.float32(0.3), as_node=False)
            y, _ = self.node("Dropout", [x.name, ratio], [x.shape, x.shape], "dropout")
            return y  # the mask output stays unused
        return self.one(kind, [x.name], x.shape)

    # ---- heads ----
    def head(self, x: T) -> T:
        r = self.head_rng.random()
        self.rng = self.head_rng  # the head does not depend on how many blocks came before
        c, (h, w) = x.c, x.hw
        if r < 0.17:
            return x if self.chance(0.5) else self.conv(x, k=1, stride=1, base="head_conv")
        if r < 0.34:
            s = self.b_gap(x)
            if self.chance(0.5):
                flat = self.one("Flatten", [s.name], (1, c), "flatten", axis=1)
            else:
                inputs, attrs = [s.name], {}
                self.axes_input(inputs, [2, 3], 13, attrs)
                flat = self.one("Squeeze", inputs, (1, c), "squeeze", **attrs)
            return self.mlp_head(flat)
        if r < 0.5 and c * h * w <= 2048:
            n = c * h * w
            form = self.pick(["flatten", "reshape", "dynamic", "nhwc", "rows"])
            if form == "flatten":
                flat = self.one("Flatten", [x.name], (1, n), "flatten", axis=self.pick([1, 0]))
            elif form == "rows":  # (C*H, W) rows, transposed: features c * H + h on axis 1
                rows = self.one("Flatten", [x.name], (c * h, w), "flatten", axis=3)
                flat = self.one("Transpose", [rows.name], (w, c * h), "transpose", perm=[1, 0])
                y = self.linear(flat, int(self.rng.integers(2, 9)))
                return self.act(y) if self.chance(0.5) else y
            elif form == "reshape":
                flat = self.reshape(x, self.pick([[1, -1], [0, -1], [1, n]]), (1, n))
            elif form == "dynamic":  # torch: x.view(x.size(0), -1)
                if self.opset >= 15 and self.chance(0.5):
                    batch = self.one("Shape", [x.name], (1,), "shape", end=1)
                else:
                    shape = self.one("Shape", [x.name], (4,), "shape")
                    batch = self.one("Gather", [shape.name, self.iconst("index", 0)], (),
                                     "gather", axis=0)
                    inputs, attrs = [batch.name], {}
                    self.axes_input(inputs, [0], 13, attrs)
                    batch = self.one("Unsqueeze", inputs, (1,), "unsqueeze", **attrs)
                if self.chance(0.5):
                    features = self.iconst("minus_one", [-1])
                else:  # x.view(x.size(0), x.size(1) * x.size(2) * x.size(3))
                    shape = self.one("Shape", [x.name], (4,), "shape")
                    dims = [self.one("Gather", [shape.name, self.iconst("index", [i])], (1,),
                                     "gather", axis=0) for i in (1, 2, 3)]
                    product = self.one("Mul", [dims[0].name, dims[1].name], (1,), "mul")
                    features = self.one("Mul", [product.name, dims[2].name], (1,), "mul").name
                spec = self.one("Concat", [batch.name, features], (2,), "concat", axis=0)
                flat = self.one("Reshape", [x.name, spec.name], (1, n), "reshape")
            else:  # channels-last flatten: feature s * C + c
                y = self.one("Transpose", [x.name], (1, h, w, c), "to_nhwc", perm=[0, 2, 3, 1])
                flat = self.one("Flatten", [y.name], (1, n), "flatten", axis=1) \
                    if self.chance(0.5) else self.reshape(y, self.pick([[1, -1], [0, n]]), (1, n))
            return self.mlp_head(flat)
        if r < 0.65:
            inputs, attrs = [x.name], {"keepdims": 0}
            self.axes_input(inputs, [2, 3], 18, attrs)
            s = self.one("ReduceMean", inputs, (1, c), "pool", **attrs)
            return self.mlp_head(s)
        if r < 0.8:
            if self.chance(0.5):
                y = self.one("Transpose", [x.name], (1, h, w, c), "to_nhwc", perm=[0, 2, 3, 1])
                y = self.reshape(y, [1, h * w, c], (1, h * w, c))
            else:  # ViT patch tokens: (1, C, H*W) -> (1, H*W, C)
                if self.chance(0.5):
                    y = self.one("Flatten", [x.name], (c, h * w), "flatten", axis=2)
                    inputs, attrs = [y.name], {}
                    self.axes_input(inputs, [0], 13, attrs)
                    y = self.one("Unsqueeze", inputs, (1, c, h * w), "unsqueeze", **attrs)
                else:
                    y = self.reshape(x, self.pick([[1, c, -1], [0, 0, -1]]), (1, c, h * w))
                y = self.one("Transpose", [y.name], (1, h * w, c), "tokens", perm=[0, 2, 1])
            return self.mlp_head(y)
        if r < 0.9 and h * w <= 256:
            y = self.one("Flatten", [x.name], (c, h * w), "flatten", axis=2)
            f = int(self.rng.integers(4, 17))
            return self.one("MatMul", [y.name, self.const("head_w", self.floats(
                (h * w, f), 1 / np.sqrt(h * w)))], (c, f), "spatial_fc")
        return self.conv(x, k=1, stride=1, base="head_conv")

    def linear(self, x: T, f: int) -> T:
        k = x.shape[-1]
        if len(x.shape) == 2 and self.chance(0.6):
            trans_b = int(self.chance(0.5))
            wshape = (f, k) if trans_b else (k, f)
            a = x
            attrs = {"transB": trans_b} if trans_b or self.chance(0.3) else {}
            if self.chance(0.05):
                a = self.one("Transpose", [x.name], (k, x.shape[0]), "transpose", perm=[1, 0])
                attrs["transA"] = 1
            inputs = [a.name, self.linear_weight("gemm_w", wshape, k)]
            if self.chance(0.7):
                bias_shape = self.pick([(f,), (1, f), (f,), (1,)])
                inputs.append(self.const("gemm_b", self.floats(bias_shape, 0.1)))
            return self.one("Gemm", inputs, (x.shape[0], f), "gemm", **attrs)
        y = self.one("MatMul", [x.name, self.linear_weight("fc_w", (k, f), k)], (*x.shape[:-1], f),
                     "fc")
        if self.chance(0.6):
            y = self.one("Add", [y.name, self.const("fc_b", self.floats(f, 0.1))], y.shape,
                         "fc_bias")
        return y

    def linear_weight(self, base: str, shape: tuple[int, int], fan_in: int) -> str:
        """A 2-D weight: new, tied to an earlier one of that shape, or stored transposed."""
        tied = self.linear_weights.get(shape, [])
        if tied and self.chance(0.1):
            return self.pick(tied)
        value = self.floats(shape, 1 / np.sqrt(fan_in))
        if self.chance(0.05):  # W^T stored, transposed at run time (a foldable constant)
            stored = self.const(f"{base}_t", np.ascontiguousarray(value.T))
            name = self.one("Transpose", [stored], shape, f"{base}_transpose", perm=[1, 0]).name
        else:
            name = self.weight(base, value)
        self.linear_weights.setdefault(shape, []).append(name)
        return name

    def mlp_block(self, x: T) -> T:
        """One block on features on the last axis (2-D or 3-D activations)."""
        f = x.shape[-1]
        kinds = ["linear", "linear", "linear", "residual", "concat", "split", "slice", "gate",
                 "softmax"]
        if len(x.shape) == 3:
            kinds.append("attention")
        if self.opset >= 17:
            kinds.append("layernorm")
        kind = self.pick(kinds)
        if kind == "linear":
            y = self.linear(x, int(self.rng.integers(4, 17)))
            return self.act(y) if self.chance(0.7) else y
        if kind == "residual":  # x + fc(act(fc(x)))
            z = self.linear(self.act(self.linear(x, int(self.rng.integers(4, 17)))), f)
            return self.one(self.pick(["Add", "Add", "Mul"]), [x.name, z.name], x.shape, "res")
        if kind == "attention":  # single-head self-attention with a residual
            d = int(self.rng.integers(2, 9))
            q, k, v = (self.linear(x, d) for _ in range(3))
            kt = self.one("Transpose", [k.name], (1, d, x.shape[1]), "transpose", perm=[0, 2, 1])
            scores = self.one("MatMul", [q.name, kt.name], (1, x.shape[1], x.shape[1]), "scores")
            scores = self.one("Softmax", [scores.name], scores.shape, axis=-1) \
                if self.opset >= 13 else scores
            ctx = self.one("MatMul", [scores.name, v.name], v.shape, "context")
            out = self.linear(ctx, f)
            return self.one("Add", [x.name, out.name], x.shape, "res")
        if kind == "gate":  # x * sigmoid(fc(x))
            g = self.one("Sigmoid", [self.linear(x, f).name], x.shape, "gate")
            return self.one("Mul", [x.name, g.name], x.shape, "scale")
        if kind == "layernorm":
            return self.one("LayerNormalization",
                            [x.name, self.const("ln_scale", self.floats(f, 0.1, 1.0))],
                            x.shape, "ln", axis=-1)
        if kind == "softmax":
            return self.one("Softmax", [x.name], x.shape, axis=-1 if self.opset >= 13 else 1)
        axis = len(x.shape) - 1
        if kind == "concat":
            a = self.linear(x, int(self.rng.integers(2, 9)))
            b = x if self.chance(0.4) else self.linear(x, int(self.rng.integers(2, 9)))
            parts = [a, b] if self.chance(0.5) else [b, a]
            total = a.shape[-1] + b.shape[-1]
            return self.one("Concat", [p.name for p in parts], (*x.shape[:-1], total),
                            "concat", axis=self.pick([axis, -1]))
        if f < 3:
            return self.linear(x, int(self.rng.integers(4, 17)))
        if kind == "split":
            k = int(self.rng.integers(1, f))
            a, b = self.split_node(x, axis, [k, f - k])
            b = self.linear(b, k) if self.chance(0.5) else b
            if b.shape == a.shape:
                return self.one("Add", [a.name, b.name], a.shape, "res")
            return self.one("Concat", [b.name, a.name], (*x.shape[:-1], b.shape[-1] + k),
                            "concat", axis=-1)
        start = int(self.rng.integers(0, f - 1))
        stop = int(self.rng.integers(start + 1, f + 1))
        ends = INT64_MAX if stop == f and self.chance(0.5) else stop
        y = self.one("Slice", [x.name, self.iconst("starts", [start]), self.iconst("ends", [ends]),
                               self.iconst("axes", [self.pick([axis, -1])])],
                     (*x.shape[:-1], stop - start), "slice")
        return self.linear(y, int(self.rng.integers(4, 17)))

    def mlp_head(self, x: T, n_blocks: int | None = None) -> T:
        n_blocks = int(self.rng.integers(0, 3)) if n_blocks is None else n_blocks
        for _ in range(n_blocks):
            x = self.mlp_block(x)
        y = self.linear(x, int(self.rng.integers(2, 11)))
        if self.chance(0.3):
            y = self.one("Softmax", [y.name], y.shape, axis=-1 if self.opset >= 13 else 1)
        return y


Block = Callable[[_Gen, T], T]
#: (block, weight): how often each block is drawn.
BLOCKS: list[tuple[Block, float]] = [
    (_Gen.b_conv, 4), (_Gen.depthwise, 1.5), (_Gen.b_grouped, 0.7), (_Gen.b_convtranspose, 0.7),
    (_Gen.b_bn_act, 1), (_Gen.b_pool, 1), (_Gen.b_gap, 0.2), (_Gen.b_residual, 2.5),
    (_Gen.b_concat_channels, 1.5), (_Gen.b_concat_spatial, 0.5), (_Gen.b_split_channels, 1.5),
    (_Gen.b_split_spatial, 0.4), (_Gen.b_slice_channels, 1.2), (_Gen.b_se, 1),
    (_Gen.b_resize, 0.7), (_Gen.b_pad, 0.6), (_Gen.b_shuffle, 0.4),
    (_Gen.b_reshape_roundtrip, 0.4), (_Gen.b_nhwc, 1), (_Gen.b_reduce_channels, 0.5),
    (_Gen.b_reduce_spatial, 0.4), (_Gen.b_softmax, 0.4), (_Gen.b_layernorm, 0.4),
    (_Gen.b_instancenorm, 0.3), (_Gen.b_channel_mixing, 0.3), (_Gen.b_unknown, 0.8),
    (_Gen.b_dropout_identity, 0.2), (_Gen.b_affine, 1), (_Gen.b_permute, 0.5),
    (_Gen.b_se_fc, 0.6), (_Gen.b_gather, 0.4), (_Gen.b_chunk, 0.4), (_Gen.b_slice_spatial, 0.3),
    (_Gen.b_overlap, 0.4), (_Gen.b_transpose_mid, 0.4), (_Gen.b_conv1d, 0.4),
]


def random_model(seed: int, *, max_blocks: int = 8, opset: int | None = None,
                 constants: bool | None = None, dead_nodes: bool | None = None
                 ) -> onnx.ModelProto:
    """A random CNN/MLP DAG (see the module docstring).

    Args:
        seed: all randomness of the model.
        max_blocks: upper bound of the number of blocks before the head (the count is drawn in
            ``1..16`` and capped; 0 gives a model of only the stem and the head).
        opset: force a default-domain opset (else drawn from ``OPSETS``).
        constants: force weights as ``Constant`` nodes (True) or initializers (False).
        dead_nodes: keep (True) or drop (False) the nodes that feed no graph output; by default
            one model in twenty keeps them.

    Returns:
        A checked, runnable model with one float32 input ``input`` and 1-2 outputs.

    """
    gen = _Gen(seed, opset, constants, dead_nodes)
    mlp = gen.chance(0.12)
    n_blocks = min(int(gen.rng.integers(1, 17)), max_blocks)
    if mlp:
        return _random_mlp(gen, n_blocks, seed)
    cin = int(gen.rng.integers(1, 5))
    h, w = int(gen.rng.integers(4, 17)), int(gen.rng.integers(4, 17))
    x = T("input", (1, cin, h, w))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))]
    x = gen.conv_unit(x, stride=1)  # stem: every model starts from a producer
    gen.pool.append(x)
    blocks, weights = zip(*BLOCKS, strict=True)
    probs = np.array(weights) / sum(weights)
    for _ in range(n_blocks):
        if len(gen.pool) > 1 and gen.chance(0.25):
            x = gen.pick(gen.pool[:-1])  # grow a side branch from an earlier tensor
        block = blocks[int(gen.rng.choice(len(blocks), p=probs))]
        x = block(gen, x)
        assert len(x.shape) == 4, block.__name__  # blocks map NCHW to NCHW
        gen.pool.append(x)
    # A second input joins sometimes: its channels are not ours, so the partner's are blocked.
    if gen.head_rng.random() < 0.08:
        k = x.c if gen.head_rng.random() < 0.5 else int(gen.head_rng.integers(1, 5))
        other = T("input2", (1, k, *x.hw))
        inputs.append(helper.make_tensor_value_info("input2", TensorProto.FLOAT, list(other.shape)))
        if k == x.c:  # raw, or through its own conv tower (then coupled, and prunable)
            if gen.head_rng.random() < 0.5:
                saved, gen.rng = gen.rng, gen.head_rng
                other = gen.conv_unit(T(other.name, (1, 3, *x.hw)), x.c, same=True)
                gen.rng = saved
                inputs[-1] = helper.make_tensor_value_info("input2", TensorProto.FLOAT,
                                                           [1, 3, *x.hw])
            x = gen.one("Add", [x.name, other.name], x.shape, "join_input")
        else:  # its channels sit beside ours: fixed positions in the next conv's input
            x = gen.one("Concat", [x.name, other.name], (1, x.c + k, *x.hw), "join_input",
                        axis=1)
    final = gen.head(x)
    outputs = [final]
    extra = gen.head_rng.random()
    candidates = [t for t in gen.conv_outputs + gen.pool + gen.parts
                  if t.name not in (final.name, "input")]
    if extra < 0.3 and candidates:
        conv_like = [t for t in gen.conv_outputs if t.name != final.name]
        outputs.append(conv_like[int(gen.head_rng.integers(len(conv_like)))] if conv_like and
                       gen.head_rng.random() < 0.7 else
                       candidates[int(gen.head_rng.integers(len(candidates)))])
    return _finish(gen, inputs, outputs, seed)


def _random_mlp(gen: _Gen, n_blocks: int, seed: int) -> onnx.ModelProto:
    """An MLP on (1, F) or transformer-style (1, L, F) features."""
    features = int(gen.rng.integers(4, 17))
    shape = (1, features) if gen.chance(0.5) else (1, int(gen.rng.integers(2, 9)), features)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))]
    x = gen.linear(T("input", shape), int(gen.rng.integers(4, 17)))
    seen = [x]
    for _ in range(n_blocks):
        x = gen.mlp_block(x)
        seen.append(x)
    gen.rng = gen.head_rng
    final = gen.mlp_head(x, n_blocks=0)
    outputs = [final]
    if gen.head_rng.random() < 0.3:
        outputs.append(seen[int(gen.head_rng.integers(len(seen)))])
    return _finish(gen, inputs, outputs, seed)


def _finish(gen: _Gen, inputs, outputs: list[T], seed: int) -> onnx.ModelProto:
    """Drop nodes that feed no output (except in a few models: dead branches), build the model."""
    keep_dead = gen.dead_nodes if gen.dead_nodes is not None else gen.head_rng.random() < 0.05
    needed = {t.name for t in outputs}
    live = []
    for node in reversed(gen.nodes):
        if keep_dead or any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    inits = [t for t in gen.inits if t.name in needed]
    inputs = [i for i in inputs if i.name in needed]
    graph = helper.make_graph(
        live, f"fuzz_{seed}", inputs,
        [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)) for t in outputs],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", gen.opset)],
                              producer_name="onnx-fpgm-fuzz")
    model.ir_version = 8 if gen.opset <= 18 else 10
    return model

"""The ONNX ops the differentiable executor (``torch_graph``) runs, one torch function each.

Each entry maps an op type to ``fn(inputs, attrs) -> output or tuple of outputs``: ``inputs`` are
torch tensors (``None`` for an omitted optional input), ``attrs`` the node's attributes as Python
values. An attribute value or mode an entry cannot honour raises ``UnsupportedForm`` with the
reason: the executor refuses such a graph rather than compute something else. Float tensors are
computed in float32 whatever the model stores (the write-back casts to the stored dtype).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx import helper

OpFn = Callable[[list, dict], object]
OPS: dict[str, OpFn] = {}


class UnsupportedForm(Exception):
    """An op's attributes or inputs ask for something this table does not compute."""


def op(*names: str):
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def ints(value) -> list[int]:
    """A shape-like tensor (or list) as Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def axis_index(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_dtype(onnx_type: int) -> torch.dtype:
    """Torch dtype of an ONNX element type (floats computed in float32)."""
    np_type = helper.tensor_dtype_to_np_dtype(onnx_type)
    if np_type.kind == "f":
        return torch.float32
    if np_type.kind == "b":
        return torch.bool
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[np_type.itemsize] \
        if np_type.kind == "i" else {1: torch.uint8}.get(np_type.itemsize, torch.int64)


# ---- convolution and linear layers ----
def _conv_padding(x: torch.Tensor, w_shape, attrs: dict, transpose: bool = False):
    """Explicit (begin..., end...) pads from ``pads`` or ``auto_pad``."""
    spatial = len(w_shape) - 2
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    strides = attrs.get("strides", [1] * spatial)
    dilations = attrs.get("dilations", [1] * spatial)
    if auto in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0] * 2 * spatial)) if auto == "NOTSET" else [0] * 2 * spatial
    if transpose:
        raise UnsupportedForm(f"ConvTranspose auto_pad={auto}")
    begin, end = [], []
    for i in range(spatial):
        size, k = x.shape[2 + i], (w_shape[2 + i] - 1) * dilations[i] + 1
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + k - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0):
    """Apply ONNX (begin..., end...) pads over the spatial axes; returns (x, symmetric pads)."""
    spatial = len(pads) // 2
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * spatial


@op("Conv")
def _conv(inputs, attrs):
    x, w, b = (inputs + [None])[:3]
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3):
        raise UnsupportedForm(f"Conv with {spatial} spatial dims")
    x, pads = _pad_input(x, _conv_padding(x, w.shape, attrs))
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return fn(x, w, b, stride=attrs.get("strides", 1), padding=pads,
              dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(inputs, attrs):
    x, w, b = (inputs + [None])[:3]
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3) or "output_shape" in attrs:
        raise UnsupportedForm("ConvTranspose with output_shape or not 1-3 spatial dims")
    pads = _conv_padding(x, w.shape, attrs, transpose=True)
    begin, end = pads[:spatial], pads[spatial:]
    extra = list(attrs.get("output_padding", [0] * spatial))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    # the full output, then ONNX's (possibly asymmetric) pads cropped and output_padding added
    # at the end (positions no input reaches: zero before the bias)
    y = fn(x, w, None, stride=attrs.get("strides", 1), groups=attrs.get("group", 1),
           dilation=attrs.get("dilations", 1))
    flat = []
    for lead, tail, more in zip(reversed(begin), reversed(end), reversed(extra)):
        flat += [-lead, more - tail]
    if any(flat):
        y = F.pad(y, flat)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spatial))
    return y


@op("Gemm")
def _gemm(inputs, attrs):
    a, b, c = (inputs + [None])[:3]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


@op("MatMul")
def _matmul(inputs, attrs):
    return torch.matmul(inputs[0], inputs[1])


# ---- elementwise ----
def _binary(fn):
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


def _unary(fn):
    return lambda inputs, attrs: fn(inputs[0])


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
                   "Pow": torch.pow}.items():
    OPS[_name] = _binary(_fn)
for _name, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
                   "Erf": torch.erf, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
                   "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
                   "Identity": lambda x: x, "Softplus": F.softplus}.items():
    OPS[_name] = _unary(_fn)


@op("Div")
def _div(inputs, attrs):
    a, b = inputs
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@op("LeakyRelu")
def _leaky_relu(inputs, attrs):
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


@op("Elu")
def _elu(inputs, attrs):
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


@op("HardSigmoid")
def _hard_sigmoid(inputs, attrs):
    return torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0, 1)


@op("HardSwish")
def _hard_swish(inputs, attrs):
    return F.hardswish(inputs[0])


@op("Gelu")
def _gelu(inputs, attrs):
    approx = attrs.get("approximate", b"none")
    return F.gelu(inputs[0], approximate=approx.decode() if isinstance(approx, bytes) else approx)


@op("Clip")
def _clip(inputs, attrs):
    x, lo, hi = (inputs + [None, None])[:3]
    lo = attrs.get("min") if lo is None else lo
    hi = attrs.get("max") if hi is None else hi
    if isinstance(lo, torch.Tensor):
        lo = lo.reshape(())
    if isinstance(hi, torch.Tensor):
        hi = hi.reshape(())
    return torch.clamp(x, lo, hi)


# ---- normalisation and softmax ----
@op("BatchNormalization")
def _batch_norm(inputs, attrs):
    if attrs.get("training_mode", 0):
        raise UnsupportedForm("BatchNormalization in training mode")
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False,
                        eps=attrs.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instance_norm(inputs, attrs):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


@op("PRelu")
def _prelu(inputs, attrs):
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


@op("LayerNormalization")
def _layer_norm(inputs, attrs):
    x, scale, bias = (inputs + [None])[:3]
    axis = axis_index(attrs.get("axis", -1), x.dim())
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=attrs.get("epsilon", 1e-5))


@op("Softmax", "LogSoftmax")
def _softmax(inputs, attrs, log=False):
    x = inputs[0]
    fn = F.log_softmax if log else F.softmax
    if attrs["_opset"] < 13:  # the input coerced to 2-D at ``axis`` (default 1)
        axis = axis_index(attrs.get("axis", 1), x.dim())
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)
    return fn(x, dim=axis_index(attrs.get("axis", -1), x.dim()))


OPS["LogSoftmax"] = lambda inputs, attrs: _softmax(inputs, attrs, log=True)


# ---- pooling and reductions ----
def _pool_args(x, attrs):
    k = attrs["kernel_shape"]
    spatial = len(k)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedForm("pooling with auto_pad SAME")
    return k, attrs.get("strides", [1] * spatial), list(attrs.get("pads", [0] * 2 * spatial))


@op("MaxPool")
def _max_pool(inputs, attrs):
    x = inputs[0]
    k, strides, pads = _pool_args(x, attrs)
    if attrs.get("storage_order", 0):
        raise UnsupportedForm("MaxPool storage_order")
    x, padding = _pad_input(x, pads, value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(k) - 1]
    return fn(x, k, strides, padding, dilation=attrs.get("dilations", 1),
              ceil_mode=bool(attrs.get("ceil_mode", 0)))


@op("AveragePool")
def _average_pool(inputs, attrs):
    x = inputs[0]
    k, strides, pads = _pool_args(x, attrs)
    if attrs.get("dilations") and any(d != 1 for d in attrs["dilations"]):
        raise UnsupportedForm("AveragePool with dilations")
    include = bool(attrs.get("count_include_pad", 0))
    if pads[:len(k)] != pads[len(k):]:
        if not include:
            raise UnsupportedForm("AveragePool with asymmetric pads excluding padding")
        x, padding = _pad_input(x, pads)
    else:
        padding = pads[:len(k)]
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(k) - 1]
    return fn(x, k, strides, padding, ceil_mode=bool(attrs.get("ceil_mode", 0)),
              count_include_pad=include)


@op("GlobalAveragePool")
def _global_average_pool(inputs, attrs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _global_max_pool(inputs, attrs):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _reduce(fn):
    def run(inputs, attrs):
        x = inputs[0]
        axes = attrs.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = ints(inputs[1])
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [axis_index(a, x.dim()) for a in axes], keep)
    return run


OPS["ReduceMean"] = _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep))
OPS["ReduceSum"] = _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep))
OPS["ReduceMax"] = _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep))

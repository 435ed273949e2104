"""QOperator layers (onnxruntime's ``quantize_static`` with ``QuantFormat.QOperator``).

Channel algebra, as for the float ops they stand for, on integer tensors:

* ``QLinearConv(x, x_scale, x_zp, W, w_scale, w_zp, y_scale, y_zp, B)``: ``W`` is a Conv weight
  (int8), ``B`` an int32 bias, ``w_scale``/``w_zp`` per tensor or per output channel (axis 0).
  Filters are scored dequantized, ``(W - w_zp) * w_scale``; removing output o slices ``W``, ``B``
  and per-channel ``w_scale``/``w_zp`` on axis 0; removing input i slices ``W`` on axis 1.
  ``x``/``y`` parameters are per tensor (the spec's scalars) and stay.
* ``com.microsoft`` ``QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp)``: a Gemm with
  ``B`` int8, per-column ``b_scale``/``b_zp`` (one per output feature) and int32 ``C``.
* ``com.microsoft`` ``QLinearAdd``/``QLinearMul`` (per-tensor parameters): broadcasting
  element-wise ops, coupling their two operands like ``Add``/``Mul``.
* ``com.microsoft`` ``QLinearGlobalAveragePool``, ``QLinearAveragePool``, ``QLinearSigmoid``,
  ``QLinearLeakyRelu``: channels pass through (``channels_last`` puts them on the last axis;
  QLinearAveragePool blocks it).
* ``com.microsoft`` ``QLinearConcat(y_scale, y_zp, x0, x0_scale, x0_zp, x1, ...)``: a Concat of
  ``x0, x1, ...`` (per-tensor parameters).

Removing a channel equals setting its consumer weights to their zero point: integer accumulation
then makes the pruned and the masked model agree bit for bit (``validate``).
"""
from __future__ import annotations

import numpy as np

from ..registry import register
from ._util import has_input, mapped_input
from .conv import ConvHandler
from .elementwise import BroadcastHandler, UnaryHandler
from .linear import GemmHandler
from .pool import PoolHandler
from .shape import ConcatHandler

MS = "com.microsoft"


def dequantized(ctx, node, w: int, axis: int) -> np.ndarray | None:
    """``(W - zero_point) * scale`` of the integer weight at input ``w`` (parameters at
    ``w + 1``, ``w + 2``, per tensor or along ``axis``); None when any is not constant."""
    weight = ctx.const(node.inputs[w]) if has_input(node, w) else None
    scale = ctx.const(node.inputs[w + 1]) if has_input(node, w + 1) else None
    zero = ctx.const(node.inputs[w + 2]) if has_input(node, w + 2) else np.zeros((), np.int32)
    if weight is None or scale is None or zero is None or weight.ndim < 2:
        return None
    shape = [1] * weight.ndim
    if np.size(scale) > 1:
        shape[axis] = np.size(scale)
    centred = weight.astype(np.float64) - np.asarray(zero, np.float64).reshape(
        shape if np.size(zero) > 1 else ())
    return (centred * np.asarray(scale, np.float64).reshape(
        shape if np.size(scale) > 1 else ())).astype(np.float32)


def slice_per_channel(ctx, node, params: tuple[int, ...], keep: np.ndarray) -> None:
    """Slice the per-channel (1-D, more than one entry) parameters at ``params``."""
    for index in params:
        if has_input(node, index) and np.size(ctx.const(node.inputs[index])) > 1:
            ctx.slice_input(node, index, 0, keep)


@register("QLinearConv")
class QLinearConvHandler(ConvHandler):
    """QLinearConv: a Conv on integers (module docstring)."""

    WEIGHT, BIAS = 3, 8

    def weight(self, node, ctx):
        return dequantized(ctx, node, self.WEIGHT, 0)

    def propagate(self, node, ctx) -> None:
        if any(ctx.map(node.inputs[i]) is not None for i in (1, 2, 4, 5, 6, 7)
               if has_input(node, i)):
            ctx.block_inputs(node, f"quantization parameter of {node.op} {node.name} carries "
                                   "channels")
            return
        super().propagate(node, ctx)

    def slice_filter_parameters(self, node, ctx, keep_out) -> None:
        slice_per_channel(ctx, node, (4, 5), keep_out)


@register("QGemm", domain=MS)
class QGemmHandler(GemmHandler):
    """com.microsoft QGemm: a Gemm on integers (module docstring)."""

    WEIGHT, BIAS = 3, 6

    def weight(self, node, ctx):
        return dequantized(ctx, node, self.WEIGHT, 0 if int(node.attrs.get("transB", 0)) else 1)

    def slice_output_parameters(self, node, ctx, keep_out) -> None:
        slice_per_channel(ctx, node, (4, 5), keep_out)


def _refine_output(node, ctx, shape) -> None:
    """onnx cannot infer com.microsoft ops' shapes: give the output its shape (and dtype, that of
    input 0) so shapes are inferred onward from it (``AnalysisContext.refined``)."""
    out = node.outputs[0]
    if out.shape is not None or shape is None:
        return
    out.shape = list(shape)
    out.dtype = out.dtype or node.inputs[0].dtype
    ctx.refined.add(out.name)


@register("QLinearAdd", "QLinearMul", domain=MS)
class QLinearBroadcastHandler(BroadcastHandler):
    """QLinearAdd/QLinearMul: per-tensor parameters (scalars) broadcast away; A and B couple."""

    def propagate(self, node, ctx) -> None:
        a, b = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[3])
        if a is not None and b is not None:
            rank = max(len(a), len(b))
            a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
            _refine_output(node, ctx, [x if y == 1 else y if x == 1 or x is None else x
                                       for x, y in zip(a, b)])
        super().propagate(node, ctx)


@register("QLinearSigmoid", "QLinearLeakyRelu", domain=MS)
class QLinearUnaryHandler(UnaryHandler):
    """QLinearSigmoid/QLinearLeakyRelu: element-wise, channels pass through."""

    def propagate(self, node, ctx) -> None:
        _refine_output(node, ctx, ctx.shape(node.inputs[0]))
        super().propagate(node, ctx)


@register("QLinearGlobalAveragePool", domain=MS)
class QLinearGlobalAveragePoolHandler:
    """Averages each channel over its spatial dims: channels pass (axis 1, or last)."""

    def propagate(self, node, ctx) -> None:
        shape = ctx.shape(node.inputs[0])
        last = int(node.attrs.get("channels_last", 0))
        if shape is not None:
            spatial = range(1, len(shape) - 1) if last else range(2, len(shape))
            _refine_output(node, ctx, [1 if i in spatial else d for i, d in enumerate(shape)])
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        axis = len(shape) - 1 if last else 1
        if xmap.axis != axis:
            ctx.block(xmap, f"channels reach {node.op} {node.name} on axis {xmap.axis}, "
                            f"not {axis}")
            return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


def _infer_as(node, ctx, op: str, inputs: list) -> None:
    """Output shape of a com.microsoft op from its float twin's onnx shape inference."""
    import onnx

    if node.outputs[0].shape is not None or any(ctx.shape(t) is None for t in inputs):
        return
    attrs = {k: v for k, v in node.attrs.items() if k != "channels_last"}
    try:
        proto = onnx.helper.make_node(op, [t.name for t in inputs], ["y"], **attrs)
        types = {t.name: onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT,
                                                             list(ctx.shape(t)))
                 for t in inputs}
        inferred = onnx.shape_inference.infer_node_outputs(
            onnx.defs.get_schema(op, ctx.opset), proto, types)
        dims = inferred["y"].tensor_type.shape.dim
    except Exception:  # best effort: handlers block what stays unknown
        return
    _refine_output(node, ctx, [d.dim_value if d.HasField("dim_value") else None for d in dims])


@register("QLinearAveragePool", domain=MS)
class QLinearAveragePoolHandler(PoolHandler):
    """QLinearAveragePool: an AveragePool on integers (channels_first only)."""

    def propagate(self, node, ctx) -> None:
        if int(node.attrs.get("channels_last", 0)):
            ctx.block(ctx.map(node.inputs[0]), f"{node.op} {node.name} is channels-last")
            return
        _infer_as(node, ctx, "AveragePool", [node.inputs[0]])
        super().propagate(node, ctx)


@register("QLinearConcat", domain=MS)
class QLinearConcatHandler(ConcatHandler):
    """QLinearConcat: a Concat of every third input from the third (module docstring)."""

    def data_inputs(self, node) -> list:
        return list(node.inputs[2::3])

    def propagate(self, node, ctx) -> None:
        _infer_as(node, ctx, "Concat", self.data_inputs(node))
        super().propagate(node, ctx)

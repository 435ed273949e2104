"""Element-wise ops.

* Unary ops: ``y[..., c, ...] = f(x[..., c, ...])``; channels pass through unchanged.
* Broadcasting n-ary ops (Add, Sub, Mul, Div, Max, Min, Pow, Sum, Mean, PRelu): inputs are aligned
  from the right. Activations carrying channels on the same output axis are *coupled* (position c
  of every input is one channel); an activation of full width that carries no channels of ours
  blocks them; a constant with the full width on the channel axis is per-channel and is sliced;
  width-1 (broadcast) inputs need nothing. ``Add``/``Sub``/``Mul``/``Div`` by a per-channel
  constant right after a producer keep it foldable (bias add, scale).
* com.microsoft BiasGelu/FastGelu ``gelu(x + bias)``: unary, with a bias along the last axis
  sliced like a per-channel constant.
"""
from __future__ import annotations

import numpy as np

from ..channels import ChannelMap
from ..op_families import UNARY_OPS, VALUE_PRESERVING
from ..registry import register
from . import split_operands
from ._util import mapped_input, pass_like_input


@register(*UNARY_OPS)
class UnaryHandler:
    """One input carries the channels; extra inputs of these ops are attributes-like scalars."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0]) or ctx.split_map(node.inputs[0])
        if xmap is not None:
            ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


@register(*VALUE_PRESERVING)
class IdentityLikeHandler:
    """Identity, Dropout (inference), Cast: same values, same channels."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0]) or ctx.split_map(node.inputs[0])
        if xmap is None:
            return
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            ctx.block(xmap, f"mask output of Dropout {node.name} is used")
            return
        ctx.set_map(node.outputs[0], xmap)

    def apply(self, node, ctx) -> None:
        pass


@register("CastLike")
class CastLikeHandler:
    """CastLike(x, like): x's channels pass; ``like`` only lends its dtype (no channels read)."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0]) or ctx.split_map(node.inputs[0])
        if xmap is not None:
            ctx.set_map(node.outputs[0], xmap)

    def apply(self, node, ctx) -> None:
        pass


@register("Clip")
class ClipHandler:
    """Clip with scalar bounds (inputs 1, 2 or attributes)."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        for bound in node.inputs[1:]:
            if bound is not None and bound.name:
                value = ctx.const(bound)
                if value is None or np.asarray(value).size != 1:
                    ctx.block(xmap, f"bounds of Clip {node.name} are not constant scalars")
                    return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


def _aligned(rank_in: int, rank_out: int, out_axis: int) -> int:
    """The input axis that broadcasting aligns with ``out_axis`` (negative: none)."""
    return out_axis - (rank_out - rank_in)


@register("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu", "Where",
          "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Xor", "Mod",
          "BitShift")
class BroadcastHandler:
    """Broadcasting n-ary element-wise ops (see module docstring)."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if split_operands.broadcast(node, ctx):
            return
        inputs = [t for t in node.inputs if t is not None and t.name]
        shapes = [ctx.shape(t) for t in inputs]
        maps = [ctx.map(t) for t in inputs]
        if not any(m is not None for m in maps):
            return
        if any(s is None for s in shapes):
            for m in maps:
                ctx.block(m, f"input rank of {node.op} {node.name} is unknown")
            return
        rank_out = max(len(s) for s in shapes)
        out_axes = {m.axis + rank_out - len(s) for m, s in zip(maps, shapes) if m is not None}
        if len(out_axes) != 1:
            for m in maps:
                ctx.block(m, f"inputs of {node.op} {node.name} carry channels on different axes")
            return
        out_axis = out_axes.pop()
        ref = next(m for m in maps if m is not None)
        width = len(ref.labels)
        fold_member = ref.fold_member if sum(m is not None for m in maps) == 1 else None
        where = f"{node.op} {node.name}"
        for tensor, shape, cmap in zip(inputs, shapes, maps):
            axis = _aligned(len(shape), rank_out, out_axis)
            dim = shape[axis] if axis >= 0 else 1
            if cmap is not None:
                if len(cmap.labels) != width:
                    ctx.block(ref, f"a broadcast channel axis at {where}")
                    ctx.block(cmap, f"a broadcast channel axis at {where}")
                    return
                if cmap is not ref:
                    ctx.couple(ref.labels, cmap.labels, where)
                continue
            if dim == 1:
                continue
            value = ctx.const(tensor)
            if value is None:  # an activation of full width with channels that are not ours
                if dim is None or dim == width:
                    ctx.couple(ref.labels, np.full(width, -1), where)
                continue
            if fold_member is not None and (node.op == "Mul" or (
                    node.op == "Div" and node.inputs[0] is not tensor)):
                per_channel = np.moveaxis(np.asarray(value, np.float64), axis, 0).reshape(width, -1)
                if np.all(per_channel == per_channel[:, :1]):
                    scale = per_channel[:, 0]
                    ctx.scale_member(ref, scale if node.op == "Mul" else 1.0 / scale)
                else:
                    fold_member = None
        keep_fold = fold_member if node.op in ("Add", "Sub", "Mul", "Div") else None
        ctx.set_map(node.outputs[0], ChannelMap(out_axis, ref.labels, fold_member=keep_fold))

    def apply(self, node, ctx) -> None:
        if split_operands.broadcast_apply(node, ctx):
            return
        out_map = ctx.map(node.outputs[0])
        keep = ctx.keep(node.outputs[0])
        if out_map is None or keep is None:
            return
        width = len(out_map.labels)
        out_shape = ctx.shape(node.outputs[0])
        rank_out = len(out_shape) if out_shape is not None else None
        for index, tensor in enumerate(node.inputs):
            if tensor is None or not tensor.name or ctx.map(tensor) is not None:
                continue
            value = ctx.const(tensor)
            if value is None:
                continue
            rank_out = rank_out or max(out_map.axis + 1, value.ndim)
            axis = _aligned(value.ndim, rank_out, out_map.axis)
            if axis >= 0 and value.shape[axis] == width and width > 1:
                ctx.slice_input(node, index, axis, keep)


@register("BiasGelu", "FastGelu", domain="com.microsoft")
class BiasGeluHandler:
    """onnxruntime's fused ``gelu(x + bias)``: the bias runs along the last axis, so channels
    there slice it; channels elsewhere pass (the bias is the same for each of them)."""

    def propagate(self, node, ctx) -> None:
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, _ = found
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name and \
                ctx.const(node.inputs[1]) is None:
            ctx.block(xmap, f"bias of {node.op} {node.name} is not a stored constant")
            return
        pass_like_input(node, ctx, xmap)

    def apply(self, node, ctx) -> None:
        keep = ctx.keep(node.inputs[0])
        xmap = ctx.map(node.inputs[0])
        if keep is None or len(node.inputs) < 2 or node.inputs[1] is None or \
                not node.inputs[1].name or xmap.axis != len(ctx.shape(node.inputs[0])) - 1:
            return
        ctx.slice_input(node, 1, 0, keep)

"""Pooling, reductions and softmax.

* Pools (Max/Average/Lp, global or not) act per channel on NCHW: channels pass through.
  MaxPool's optional ``Indices`` output encodes the channel in a flat index: blocked if used.
* Reduce* over axes that exclude the channel axis pass channels through (moving the axis when
  ``keepdims=0``); reducing over the channel axis mixes channels: blocked. Over a level of a
  split channel axis (head_dim: a per-head norm) the level stays whole.
* Softmax/LogSoftmax/Hardmax over the channel axis mix channels: blocked; over other axes: pass.
  Over a level of a split channel axis (``blocks.py``) the values of each entry of the other
  levels are normalised apart: that level stays whole, the others may lose entries.
"""
from __future__ import annotations

from dataclasses import replace

from ..blocks import drop_level, require_whole
from ..registry import register
from ._util import axes_from, mapped_input, normalize_axis

POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
            "GlobalLpPool")
REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@register(*POOL_OPS)
class PoolHandler:
    """Per-channel spatial pooling."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        if xmap.axis != 1:
            ctx.block(xmap, f"channels reach {node.op} {node.name} on axis {xmap.axis}, not 1")
            return
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            ctx.block(xmap, f"indices output of {node.name} is used")
            return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


@register(*REDUCE_OPS)
class ReduceHandler:
    """Reductions over non-channel axes."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            _reduce_split(node, ctx)
            return
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        axes = axes_from(node, ctx, 1)
        rank = len(shape)
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                ctx.set_map(node.outputs[0], xmap.passed())
            else:
                ctx.block(xmap, f"{node.op} {node.name} reduces over all axes")
            return
        axes = sorted(normalize_axis(a, rank) for a in axes)
        if xmap.axis in axes:
            ctx.block(xmap, f"{node.op} {node.name} reduces over the channel axis")
            return
        axis = xmap.axis
        if not int(node.attrs.get("keepdims", 1)):
            axis -= sum(1 for a in axes if a < xmap.axis)
        ctx.set_map(node.outputs[0], xmap.moved(axis))

    def apply(self, node, ctx) -> None:
        pass


def _reduce_split(node, ctx) -> None:
    """A reduction over levels of a split channel axis (a per-head RMSNorm over head_dim, as
    Qwen3's q_norm/k_norm): within each entry of the other levels, so the reduced levels stay
    whole; with keepdims they keep one entry, without it they go."""
    smap, shape = ctx.split_map(node.inputs[0]), ctx.shape(node.inputs[0])
    try:
        axes = axes_from(node, ctx, 1)
    except ValueError:
        axes = None
    if shape is None or not axes:
        ctx.block(smap, f"{node.op} {node.name} reduces a split channel axis over unknown or "
                        "all axes")
        return
    axes = sorted(normalize_axis(a, len(shape)) for a in axes)
    keep = bool(int(node.attrs.get("keepdims", 1)))
    for position in reversed(range(len(smap.axes))):
        if smap.axes[position] not in axes:
            continue
        require_whole(ctx, smap, position, f"{node.op} {node.name} reduces over it")
        if len(smap.axes) == 1:
            return  # no level left: the result holds no channel of ours
        if keep:
            index = [slice(None)] * smap.labels.ndim
            index[position] = slice(0, 1)
            smap = replace(smap, labels=smap.labels[tuple(index)])
        else:
            smap = drop_level(smap, position, 0, lambda a: a)
    if not keep:
        smap = smap.moved(a - sum(1 for r in axes if r < a) for a in smap.axes)
    ctx.set_map(node.outputs[0], smap)


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxHandler:
    """Normalises over one axis (opset >= 13) or all axes from ``axis`` (older opsets)."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap = ctx.split_map(node.inputs[0])
        shape = ctx.shape(node.inputs[0])
        if smap is not None:
            axis = None if shape is None or ctx.opset < 13 else normalize_axis(
                int(node.attrs.get("axis", -1)), len(shape))
            if axis is None:
                ctx.block(smap, f"{node.op} {node.name} normalises over a split channel axis")
                return
            if axis in smap.axes:  # within each entry of the other levels: this one stays whole
                require_whole(ctx, smap, smap.position(axis),
                              f"{node.op} {node.name} normalises over it")
            ctx.set_map(node.outputs[0], smap)
            return
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        old_semantics = ctx.opset < 13
        axis = normalize_axis(int(node.attrs.get("axis", 1 if old_semantics else -1)), len(shape))
        if xmap.axis == axis or (old_semantics and xmap.axis >= axis):
            ctx.block(xmap, f"{node.op} {node.name} normalises over the channel axis")
            return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass

"""Flatten and Reshape: the channel axis kept, moved, merged with its neighbours, or split.

* Flatten/Reshape that merge the channel axis with neighbouring axes repeat each channel's label
  over the merged block in row-major order: feature ``f = (outer * C + c) * inner + i``, which
  covers NCHW flatten (``c * HW + s``) and channels-last flatten (``s * C + c``) alike. A Reshape
  that splits the channel axis itself (channel shuffle, attention heads), or reshapes a split
  one, follows the block rules of ``split_axes``.
* The Reshape target is read element by element (``shape_values``): symbolic dims (a batch read
  by ``Shape``) resolve as symbols, ``0`` copies an input dim, ``-1`` (or one element computed by
  arithmetic) takes what the others leave. The element at the output channel axis is rewritten
  to the surviving count where it is stored, unless it follows the plan by itself (``-1``, or a
  channel count read by ``Shape``: ``c * h * w`` after ``b, c, h, w = x.size()``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..channels import ChannelMap
from ..registry import register
from ..reshape_sizes import named_dims, resolve_reshape_target
from ..shape_values import (
    rewritable_source,
    shape_elements,
    symbolic_dims,
)
from . import split_axes
from ._util import normalize_axis, prod


def _merge_map(cmap: ChannelMap, in_shape, block_start: int, block_stop: int, out_axis: int):
    """Labels after axes ``block_start..block_stop`` (holding the channel axis) are merged."""
    inner = prod(in_shape[cmap.axis + 1:block_stop])
    outer = prod(in_shape[block_start:cmap.axis])
    return ChannelMap(out_axis, np.tile(np.repeat(cmap.labels, inner), outer))


@register("Flatten")
class FlattenHandler:
    """2-D reshape at ``axis``: the channel axis merges with its block."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.block(xmap, f"input shape of Flatten {node.name} is unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 1)), len(shape))
        start, stop, out_axis = (axis, len(shape), 1) if xmap.axis >= axis else (0, axis, 0)
        others = [d for i, d in enumerate(shape[start:stop], start) if i != xmap.axis]
        if any(d is None for d in others):
            ctx.block(xmap, f"Flatten {node.name} merges channels with unknown dims")
            return
        ctx.set_map(node.outputs[0], _merge_map(xmap, shape, start, stop, out_axis))

    def apply(self, node, ctx) -> None:
        pass


@dataclass(frozen=True)
class _ReshapeTarget:
    """A Reshape target resolved against its input, element by element (``shape_values``)."""

    out_map: ChannelMap | None  # the channel map of the output; None: blocked (see reason)
    reason: str = ""
    out_dims: list | None = None  # ints, symbols, None (unknown)


def reshape_target(node, ctx, xmap: ChannelMap) -> _ReshapeTarget:
    """Where the channels of ``xmap`` land through Reshape ``node`` (partly computed targets too).

    Elements of the target that carry the output's channel count must be constants that can be
    rewritten (or -1, or ``0`` copying the same axis, or the very channel count read by
    ``Shape``, which follows the plan by itself); the batch and other elements may be computed.
    Another tensor's channel count sizing these channels (an SE block's ``view(b, c, 1, 1)``)
    is coupled to them here, in ``ctx`` (analysis only).
    """
    where = f"Reshape {node.name}"
    in_dims = symbolic_dims(node.inputs[0])
    elements = shape_elements(node, 1, ctx)
    if in_dims is None or elements is None:
        return _ReshapeTarget(None, f"{where} has a computed shape or unknown input dims")
    allowzero = bool(node.attrs.get("allowzero", 0))
    resolved = resolve_reshape_target(in_dims, elements, allowzero)
    if resolved is None:
        return _ReshapeTarget(None, f"cannot resolve the target shape of {where} (computed shape)")
    in_numbers, out_numbers, in_symbolic = resolved
    result = _reshape_map(xmap, in_numbers, out_numbers, in_symbolic)
    if isinstance(result, str):
        return _ReshapeTarget(None, f"{where} {result}")
    carried = elements[result.axis]
    for i, element in enumerate(elements):
        if element.channels is not None and i != result.axis:
            return _ReshapeTarget(None, f"channel count read by {where} at position {i}")
    if carried.labels is not None and not _counts_follow(carried, result.labels):
        # SE block: ``y.view(b, c, 1, 1)`` with ``c`` read from another tensor. Pruning both
        # channel sets alike keeps the count equal to the channels y has.
        if carried.factor != 1 or len(carried.labels) != len(result.labels):
            return _ReshapeTarget(None, f"channel count read by {where} does not match")
        ctx.couple(carried.labels, result.labels, where)
    follows = carried.labels is not None or carried.value == -1 or (
        carried.value == 0 and not allowzero and xmap.axis == result.axis)
    if not follows and (carried.value is None or
                        rewritable_source(node, 1, result.axis, elements, ctx) is None):
        return _ReshapeTarget(None, f"the channel count in the target of {where} is computed "
                                    "(computed shape)")
    return _ReshapeTarget(result, out_dims=named_dims(out_numbers, in_dims, elements))


def _counts_follow(element, labels: np.ndarray) -> bool:
    """True when ``factor`` times the element's channel count is the size of an axis holding
    ``labels`` at every plan (each of its channels repeated ``factor`` times)."""
    if element.factor == 1:
        return np.array_equal(element.labels, labels)
    repeated = np.repeat(element.labels, element.factor)
    return len(repeated) == len(labels) and np.array_equal(np.sort(repeated), np.sort(labels))


@register("Reshape")
class ReshapeHandler:
    """Keeps, merges (repeat/tile labels) or splits (``split_axes``) the channel axis."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            split_axes.reshape_split_input(node, ctx, smap)
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        if split_axes.reshape_splits(node, ctx, xmap):
            return
        target = reshape_target(node, ctx, xmap)
        if target.out_map is None:
            ctx.block(xmap, target.reason)
            return
        ctx.set_map(node.outputs[0], target.out_map)
        if node.outputs[0].shape is None and not any(
                isinstance(d, str) and d.startswith("?") for d in target.out_dims):
            # onnx's inference cannot follow a computed target; later handlers need the rank.
            node.outputs[0].shape = target.out_dims
            ctx.refined.add(node.outputs[0].name)

    def apply(self, node, ctx) -> None:
        if split_axes.reshape_apply(node, ctx):
            return
        out_map = ctx.map(node.outputs[0])
        keep = ctx.keep(node.outputs[0])
        if out_map is None or keep is None:
            return
        elements = shape_elements(node, 1, ctx)
        carried = elements[out_map.axis]
        allowzero = bool(node.attrs.get("allowzero", 0))
        if carried.labels is not None or carried.value == -1 or (
                carried.value == 0 and not allowzero and
                ctx.map(node.inputs[0]).axis == out_map.axis):
            return  # follows the plan by itself
        ctx.set_shape_element(rewritable_source(node, 1, out_map.axis, elements, ctx), len(keep))


def _reshape_map(cmap: ChannelMap, in_shape: list[int], out_shape: list[int],
                 symbolic: set[int] = frozenset()) -> ChannelMap | str:
    """Map the channel axis through a reshape by matching blocks of equal products.

    ``symbolic``: input positions whose size is a symbol (a stand-in prime): the channel axis
    may not merge with those. Returns the map, or why the channels cannot be followed.
    """
    if prod(in_shape) != prod(out_shape) or in_shape[cmap.axis] <= 1:
        return "splits the channel axis"
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0 = i, j
        p_in = in_shape[i] if i < len(in_shape) else 1
        p_out = out_shape[j] if j < len(out_shape) else 1
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out and i < len(in_shape):
                p_in *= in_shape[i]
                i += 1
            elif j < len(out_shape):
                p_out *= out_shape[j]
                j += 1
            else:
                return "splits the channel axis"
        if i0 <= cmap.axis < i:
            block_out = [k for k in range(j0, min(j, len(out_shape))) if out_shape[k] != 1]
            big_in = [k for k in range(i0, min(i, len(in_shape))) if in_shape[k] != 1]
            if len(block_out) != 1:
                return "splits the channel axis"  # (or it vanished)
            if big_in == [cmap.axis]:
                return cmap.moved(block_out[0])
            if any(k in symbolic for k in big_in):
                return "merges channels with unknown dims"
            return _merge_map(cmap, in_shape, i0, min(i, len(in_shape)), block_out[0])
    return "splits the channel axis"

"""Split and Slice on the channel axis: they cut a producer's channels into parts.

Each part is pruned independently (its own group); the sizes or bounds are rewritten to the
surviving counts. A bound computed from the channel count, as TorchScript's ``chunk`` writes
it, becomes a constant when the plan would move it. Steps other than 1 are blocked. Tensors
whose channel axis a Reshape split into levels go to ``split_axes``.
"""
from __future__ import annotations

import numpy as np

from ...errors import RewriteError
from ..registry import register
from ..shape_values import rewritable_source, shape_elements
from . import split_axes
from ._util import (
    has_input,
    kept_count,
    mapped_input,
    normalize_axis,
    rank_of,
    split_parts,
    surviving_sizes,
)


def _split_sizes(node, ctx, dim: int) -> list[int] | None:
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    if has_input(node, 1):  # constant, or computed from static dims (``shape_values``)
        elements = shape_elements(node, 1, ctx)
        if elements is None or not all(e.known for e in elements):
            return None
        return [e.value for e in elements]
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    size = -(-dim // n)  # ceil, as opset 18 specifies for uneven splits
    sizes = [size] * (n - 1)
    return sizes + [dim - sum(sizes)]


@register("Split")
class SplitHandler:
    """Cuts the channel axis into independent parts (or passes other-axis splits through)."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            split_axes.split(node, ctx, lambda dim: _split_sizes(node, ctx, dim))
            return
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        rank = len(shape)
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        if axis != xmap.axis:
            for out in node.outputs:
                ctx.set_map(out, xmap.passed())
            return
        sizes = _split_sizes(node, ctx, len(xmap.labels))
        if sizes is None or sum(sizes) != len(xmap.labels) or len(sizes) != len(node.outputs):
            ctx.block(xmap, f"split sizes of {node.name} are not constant or do not add up")
            return
        for out, part in zip(node.outputs, split_parts(ctx, xmap, sizes)):
            ctx.set_map(out, part)

    def apply(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None or ctx.keep(node.inputs[0]) is None:
            return
        # Decided by the axis, not by narrower outputs: a one-output Split keeps the full width
        # and still needs its size rewritten.
        rank = rank_of(ctx, node.inputs[0])
        if normalize_axis(int(node.attrs.get("axis", 0)), rank) != xmap.axis:
            return  # a split along another axis
        new_sizes = surviving_sizes(ctx, xmap, _split_sizes(node, ctx, len(xmap.labels)))
        if ctx.opset < 13:
            node.attrs["split"] = new_sizes
        elif has_input(node, 1):
            ctx.set_input_value(node, 1, np.array(new_sizes, dtype=np.int64))
        else:
            node.attrs.pop("num_outputs", None)
            ctx.add_input_value(node, np.array(new_sizes, dtype=np.int64), f"{node.name}_split")


def _slice_params(node, ctx):
    """(starts, ends, axes, steps, elements) with None for computed entries; None when the axes
    are not constant. ``elements`` (opset >= 10): the parsed inputs 1..4, for rewriting."""
    if ctx.opset < 10:
        starts = list(node.attrs.get("starts", []))
        ends = list(node.attrs.get("ends", []))
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts), {}
    values, elements = [], {}
    for index in range(1, 5):
        if has_input(node, index):
            parsed = shape_elements(node, index, ctx)
            if parsed is None:
                return None
            elements[index] = parsed
            values.append([e.value for e in parsed])
        else:
            values.append(None)
    starts, ends, axes, steps = values
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if any(a is None for a in axes) or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    return starts, ends, axes, steps, elements


def _clamp(index: int, dim: int) -> int:
    index = index + dim if index < 0 else index
    return max(0, min(index, dim))


def _check_slice_bounds(node, ctx, params, k: int, dim: int) -> str | None:
    """Why the channel range of Slice ``node`` (entry ``k``) cannot be followed, or None.

    Bounds of other axes may be computed (a crop to another tensor's size), but not from a
    channel count; the channel entries must be known, and rewritable where the plan moves them.
    """
    starts, ends, _, steps, elements = params
    for index, parsed in elements.items():
        if any(e.channels is not None for i, e in enumerate(parsed) if i != k):
            return f"channel count read by Slice {node.name}"
    if starts[k] is None or ends[k] is None or steps[k] is None:
        return f"bounds of Slice {node.name} are not constant"
    movable = [(1, _clamp(starts[k], dim) > 0), (2, ends[k] < dim)]
    for index, moves in movable:
        if moves and index in elements and \
                rewritable_source(node, index, k, elements[index], ctx) is None:
            return f"bounds of Slice {node.name} are not constant (computed and shared)"
    return None


@register("Slice")
class SliceHandler:
    """A contiguous channel range (cut from the rest), or a slice of other axes."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            params = _slice_params(node, ctx)
            split_axes.slice_(node, ctx, None if params is None else params[:4],
                              None if params is None or ctx.opset < 10 else
                              lambda k, dim: _check_slice_bounds(node, ctx, params, k, dim)
                              is None)
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = rank_of(ctx, node.inputs[0])
        params = _slice_params(node, ctx)
        if params is None or rank is None:
            ctx.block(xmap, f"bounds of Slice {node.name} are not constant")
            return
        starts, ends, axes, steps, _ = params
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis not in axes:
            ctx.set_map(node.outputs[0], xmap.passed())
            return
        k = axes.index(xmap.axis)
        dim = len(xmap.labels)
        reason = _check_slice_bounds(node, ctx, params, k, dim)
        if reason:
            ctx.block(xmap, reason)
            return
        if steps[k] != 1:
            ctx.block(xmap, f"Slice {node.name} steps over channels")
            return
        start, stop = _clamp(starts[k], dim), _clamp(ends[k], dim)
        stop = max(start, stop)
        ctx.cut(xmap.labels, start)
        ctx.cut(xmap.labels, stop)
        ctx.set_map(node.outputs[0], xmap.moved(xmap.axis, xmap.labels[start:stop]))

    def apply(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            _apply_slice_of_split(node, ctx)
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None or ctx.keep(node.inputs[0]) is None:
            return
        rank = rank_of(ctx, node.inputs[0])
        starts, ends, axes, _, elements = _slice_params(node, ctx)
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis not in axes:
            return
        k = axes.index(xmap.axis)
        dim = len(xmap.labels)
        start, stop = _clamp(starts[k], dim), max(_clamp(starts[k], dim), _clamp(ends[k], dim))
        new_start = kept_count(ctx, xmap, 0, start)
        new_stop = new_start + kept_count(ctx, xmap, start, stop)
        if ctx.opset < 10:
            starts, ends = list(starts), list(ends)
            starts[k] = new_start
            if not (ends[k] >= dim):  # "to the end" stays "to the end"
                ends[k] = new_stop
            node.attrs["starts"], node.attrs["ends"] = starts, ends
            return
        if _computed_from_channels(ctx, elements[1][k], new_start):
            _set_bounds_constant(node, ctx, 1, k, new_start)
        elif new_start != starts[k]:
            ctx.set_shape_element(rewritable_source(node, 1, k, elements[1], ctx), new_start)
        if ends[k] >= dim and elements[2][k].channels is None:
            return  # "to the end" stays "to the end"
        elements[2] = shape_elements(node, 2, ctx)  # input 1 may share its constant
        if _computed_from_channels(ctx, elements[2][k], new_stop):
            _set_bounds_constant(node, ctx, 2, k, new_stop)
        elif new_stop != ends[k]:
            ctx.set_shape_element(rewritable_source(node, 2, k, elements[2], ctx), new_stop)


def _apply_slice_of_split(node, ctx) -> None:
    """A Slice of a split tensor's level that lost head dims (rotate_half's halves): its
    bounds become the kept counts below them."""
    found = ctx.split_keeps(node.inputs[0])
    if not found:
        return
    smap, rank = ctx.split_map(node.inputs[0]), rank_of(ctx, node.inputs[0])
    starts, ends, axes, _, elements = _slice_params(node, ctx)
    axes = [normalize_axis(a, rank) for a in axes]
    for axis, keep in found:
        if axis not in axes:
            continue
        k, dim = axes.index(axis), smap.labels.shape[smap.axes.index(axis)]
        start, stop = _clamp(starts[k], dim), max(_clamp(starts[k], dim), _clamp(ends[k], dim))
        new_start, new_stop = int(np.count_nonzero(keep < start)), int(np.count_nonzero(keep < stop))
        if new_start != starts[k] or _computed(elements[1][k]):
            ctx.set_shape_element(rewritable_source(node, 1, k, elements[1], ctx), new_start)
        if ends[k] < dim and (new_stop != ends[k] or _computed(elements[2][k])):
            elements[2] = shape_elements(node, 2, ctx)  # input 1 may share its constant
            ctx.set_shape_element(rewritable_source(node, 2, k, elements[2], ctx), new_stop)


def _computed_from_channels(ctx, element, new_value: int) -> bool:
    """True when a bound is computed from a channel count at run time and would not land on
    ``new_value`` by itself (``chunk``'s ``(C + 1) // 2`` once the halves keep unequal counts)."""
    if element.channels is None:
        return False
    if element.labels is not None:
        runtime = element.factor * int(np.count_nonzero(ctx.kept_mask(element.labels)))
        return runtime != new_value
    return True


def _set_bounds_constant(node, ctx, index: int, k: int, value: int) -> None:
    """Replace a computed bounds vector by constants (the channel count is fixed after
    pruning); its other entries must be known."""
    elements = shape_elements(node, index, ctx)
    if elements is None or any(e.value is None for i, e in enumerate(elements) if i != k):
        raise RewriteError(f"bounds of Slice {node.name} are computed from the channel count "
                           "together with unknown entries")
    values = np.array([value if i == k else e.value for i, e in enumerate(elements)], np.int64)
    ctx.set_input_value(node, index, values)


def _computed(element) -> bool:
    """A bound computed from static dims (TorchScript's ``Shape(q)[3] // 2``): it is stored as a
    constant even where its value stays, since at run time it would follow the pruned dims."""
    return element.source is not None and element.source.values is not None

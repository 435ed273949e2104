"""Ops that move, join, cut or reshape the channel axis.

* Transpose/Squeeze/Unsqueeze move the channel axis; Gather on another axis moves it too.
* Concat on the channel axis places the inputs' channels side by side (unmapped inputs are fixed
  positions); on another axis it couples its inputs position by position.
* Split/Slice on the channel axis cut the channels into parts (independent groups); their sizes
  or bounds are rewritten to the surviving counts (a bound computed from the channel count,
  as TorchScript's ``chunk`` writes it, becomes a constant when the plan would move it). Steps
  other than 1 are blocked.
* Flatten/Reshape: see ``reshape.py``. Tensors whose channel axis a Reshape split into levels
  (heads, shuffle groups) are handled by ``split_axes`` in every handler here.
* Resize/Upsample/Pad act on other axes (a ``sizes`` entry for the channel axis is rewritten);
  scaling or padding the channel axis is blocked.
* Shape of a mapped tensor is tracked so that reading the batch size does not block the channels,
  while reading the channel count does.
"""
from __future__ import annotations

import numpy as np

from ...errors import RewriteError
from ..analysis import ChannelMap
from ..registry import register
from ..shape_values import rewritable_source, shape_elements
from . import split_axes
from ._util import (
    axes_from,
    has_input,
    mapped_input,
    normalize_axis,
    split_parts,
    surviving_sizes,
    transpose_perm,
)


def _rank(ctx, tensor) -> int | None:
    shape = ctx.shape(tensor)
    return None if shape is None else len(shape)


def _kept_count(ctx, cmap: ChannelMap, start: int, stop: int) -> int:
    return int(np.count_nonzero(ctx.kept_mask(cmap.labels[start:stop])))


@register("Transpose")
class TransposeHandler:
    """Moves the channel axis to ``perm.index(axis)``."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            split_axes.transpose(node, ctx)
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        perm = transpose_perm(node, _rank(ctx, node.inputs[0]))
        if perm is None:
            ctx.block(xmap, f"rank of the input of {node.name} is unknown")
            return
        ctx.set_map(node.outputs[0], xmap.moved(perm.index(xmap.axis)))

    def apply(self, node, ctx) -> None:
        pass


@register("Squeeze", "Unsqueeze")
class SqueezeHandler:
    """Removes or inserts size-1 axes around the channel axis."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            split_axes.squeeze(node, ctx)
            return
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        rank = len(shape)
        axes = axes_from(node, ctx, 1)
        if node.op == "Squeeze":
            if axes is None:
                axes = [i for i, d in enumerate(shape) if d == 1]
                if any(d is None for d in shape):
                    ctx.block(xmap, f"Squeeze {node.name} without axes on unknown dims")
                    return
            axes = [normalize_axis(a, rank) for a in axes]
            if xmap.axis in axes:
                ctx.block(xmap, f"Squeeze {node.name} removes the channel axis")
                return
            ctx.set_map(node.outputs[0], xmap.moved(xmap.axis - sum(a < xmap.axis for a in axes)))
        else:
            out_rank = rank + len(axes)
            inserted = sorted(normalize_axis(a, out_rank) for a in axes)
            kept_positions = [i for i in range(out_rank) if i not in inserted]
            ctx.set_map(node.outputs[0], xmap.moved(kept_positions[xmap.axis]))

    def apply(self, node, ctx) -> None:
        # A Squeeze without axes drops every size-1 axis: pruned to one channel, it would drop
        # the channel axis too. Write out the axes it drops in the original model.
        if node.op != "Squeeze" or ctx.keep(node.inputs[0]) is None or \
                axes_from(node, ctx, 1) is not None:
            return
        axes = [i for i, d in enumerate(ctx.shape(node.inputs[0])) if d == 1]
        if ctx.opset < 13:
            node.attrs["axes"] = axes
        else:
            ctx.add_input_value(node, np.array(axes, dtype=np.int64), f"{node.name}_axes")


@register("Concat")
class ConcatHandler:
    """Joins channels on the channel axis, couples them on any other axis."""

    def data_inputs(self, node) -> list:
        """The tensors joined (com.microsoft QLinearConcat interleaves their parameters)."""
        return list(node.inputs)

    def propagate(self, node, ctx) -> None:
        inputs = self.data_inputs(node)
        maps = [ctx.map(t) for t in inputs]
        if not any(m is not None for m in maps):
            return
        shapes = [ctx.shape(t) for t in inputs]
        where = f"{node.op} {node.name}"
        if any(s is None for s in shapes):
            for m in maps:
                ctx.block(m, f"input shapes of {where} are unknown")
            return
        rank = len(shapes[0])
        axis = normalize_axis(int(node.attrs["axis"]), rank)
        channel_axes = {m.axis for m in maps if m is not None}
        if len(channel_axes) != 1:
            for m in maps:
                ctx.block(m, f"inputs of {where} carry channels on different axes")
            return
        channel_axis = channel_axes.pop()
        if channel_axis == axis:
            parts = []
            for cmap, shape in zip(maps, shapes):
                if cmap is not None:
                    parts.append(cmap.labels)
                elif shape[axis] is None:
                    for m in maps:
                        ctx.block(m, f"an input of {where} has an unknown channel count")
                    return
                else:
                    parts.append(np.full(shape[axis], -1, dtype=np.int64))
            ctx.set_map(node.outputs[0], ChannelMap(axis, np.concatenate(parts)))
            return
        ref = next(m for m in maps if m is not None)
        for cmap, shape in zip(maps, shapes):
            if cmap is None:
                ctx.couple(ref.labels, np.full(len(ref.labels), -1), where)
            elif cmap is not ref:
                if len(cmap.labels) != len(ref.labels):
                    ctx.block(ref, f"{where} joins different channel counts")
                    ctx.block(cmap, f"{where} joins different channel counts")
                    return
                ctx.couple(ref.labels, cmap.labels, where)
        ctx.set_map(node.outputs[0], ref.passed())

    def apply(self, node, ctx) -> None:
        pass


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
        rank = _rank(ctx, node.inputs[0])
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
            split_axes.slice_(node, ctx, None if params is None else params[:4])
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = _rank(ctx, node.inputs[0])
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
        xmap = ctx.map(node.inputs[0])
        if xmap is None or ctx.keep(node.inputs[0]) is None:
            return
        rank = _rank(ctx, node.inputs[0])
        starts, ends, axes, _, elements = _slice_params(node, ctx)
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis not in axes:
            return
        k = axes.index(xmap.axis)
        dim = len(xmap.labels)
        start, stop = _clamp(starts[k], dim), max(_clamp(starts[k], dim), _clamp(ends[k], dim))
        new_start = _kept_count(ctx, xmap, 0, start)
        new_stop = new_start + _kept_count(ctx, xmap, start, stop)
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


@register("Resize", "Upsample")
class ResizeHandler:
    """Spatial resize; the channel axis must keep scale 1 (a ``sizes`` entry is rewritten)."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        if node.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
            ctx.block(xmap, f"Resize {node.name} crops with a roi")
            return
        entry = self._channel_entry(node, ctx, xmap)
        if entry is None:
            ctx.block(xmap, f"Resize {node.name} has computed or channel-changing scales/sizes")
            return
        if entry[0] == "follows":
            ctx.couple(entry[2], xmap.labels, f"Resize {node.name}")
        ctx.set_map(node.outputs[0], xmap.passed())

    @staticmethod
    def _channel_entry(node, ctx, xmap):
        """('scales'|'sizes'|'attr'|'follows', index[, labels]) when the channels pass."""
        axes = node.attrs.get("axes")
        if axes is not None:  # opset 18+: may count from the back
            rank = _rank(ctx, node.inputs[0])
            if rank is None:
                return None
            axes = [normalize_axis(int(a), rank) for a in axes]
        position = list(axes).index(xmap.axis) if axes is not None and xmap.axis in axes else (
            None if axes is not None else xmap.axis)
        if "scales" in node.attrs:  # Upsample-7
            scales = list(node.attrs["scales"])
            return ("attr", position) if scales[xmap.axis] == 1 else None
        scales_index = 1 if node.op == "Upsample" or ctx.opset < 11 else 2
        if has_input(node, scales_index):
            scales = ctx.const(node.inputs[scales_index])
            if scales is None:
                return None
            scales = np.asarray(scales).reshape(-1)
            if len(scales):
                ok = position is None or scales[position] == 1
                return ("scales", position) if ok else None
        if node.op == "Resize" and has_input(node, 3):
            return _sizes_entry(node, ctx, xmap, position)
        return None

    def apply(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        keep = ctx.keep(node.inputs[0])
        if xmap is None or keep is None:
            return
        kind, position = self._channel_entry(node, ctx, xmap)[:2]
        if kind == "sizes" and position is not None:
            elements = shape_elements(node, 3, ctx)
            ctx.set_shape_element(rewritable_source(node, 3, position, elements, ctx), len(keep))


def _sizes_entry(node, ctx, xmap: ChannelMap, position: int | None):
    """Resize ``sizes`` (partly computed, e.g. ``Concat(Shape(x)[0:2], Shape(y)[2:])``).

    The channel entry must be a rewritable constant equal to the channel count, or the channel
    count of the input itself read by ``Shape`` (it follows the plan by itself).
    """
    elements = shape_elements(node, 3, ctx)
    if elements is None:
        return None
    for i, element in enumerate(elements):
        if element.channels is not None and i != position:
            return None

    if position is None:
        return ("sizes", None)
    if position >= len(elements):
        return None
    carried = elements[position]
    if carried.labels is not None:
        # The input's own channel count follows the plan; another tensor's count of as many
        # channels does too once the two are coupled (by ``propagate``).
        same = len(carried.labels) == len(xmap.labels)
        return ("follows", position, carried.labels) if same else None
    if carried.value != len(xmap.labels) or \
            rewritable_source(node, 3, position, elements, ctx) is None:
        return None
    return ("sizes", position)


@register("Pad")
class PadHandler:
    """Padding of non-channel axes passes channels through; padding channels is blocked."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = _rank(ctx, node.inputs[0])
        pads = node.attrs.get("pads") if ctx.opset < 11 else (
            ctx.const(node.inputs[1]) if has_input(node, 1) else None)
        if pads is None or rank is None:
            ctx.block(xmap, f"pads of Pad {node.name} are not constant")
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        try:
            axes = axes_from(node, ctx, 3) or list(range(rank))
        except ValueError:
            ctx.block(xmap, f"axes of Pad {node.name} are not constant")
            return
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis in axes:
            k = axes.index(xmap.axis)
            if pads[k] != 0 or pads[k + len(axes)] != 0:
                ctx.block(xmap, f"Pad {node.name} pads the channel axis")
                return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


@register("Shape")
class ShapeHandler:
    """Records which element of the shape vector is a channel count."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            split_axes.shape(node, ctx)
            return
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        rank = len(shape)
        start = normalize_axis(int(node.attrs.get("start", 0)), rank)
        end = node.attrs.get("end")
        end = rank if end is None else normalize_axis(int(end), rank)
        if start <= xmap.axis < min(end, rank):
            ctx.shape_maps[node.outputs[0].name] = xmap

    def apply(self, node, ctx) -> None:
        pass


@register("Gather")
class GatherHandler:
    """Gather on a non-channel axis moves the channel axis; on the channel axis it blocks."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            split_axes.gather(node, ctx)
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = _rank(ctx, node.inputs[0])
        idx_rank = _rank(ctx, node.inputs[1])
        if rank is None or idx_rank is None:
            ctx.block(xmap, f"ranks around Gather {node.name} are unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        if axis == xmap.axis:
            ctx.block(xmap, f"Gather {node.name} indexes channels")
            return
        out_axis = xmap.axis if xmap.axis < axis else xmap.axis - 1 + idx_rank
        ctx.set_map(node.outputs[0], xmap.moved(out_axis))

    def apply(self, node, ctx) -> None:
        pass

"""Ops that move, join, cut or reshape the channel axis.

* Transpose/Squeeze/Unsqueeze move the channel axis; Gather on another axis moves it too.
* Concat on the channel axis places the inputs' channels side by side (unmapped inputs are fixed
  positions); on another axis it couples its inputs position by position.
* Split/Slice on the channel axis cut the channels into parts (independent groups); their sizes
  or bounds are rewritten to the surviving counts. Steps other than 1 are blocked.
* Flatten/Reshape that merge the channel axis with neighbouring axes repeat each channel's label
  over the merged block in row-major order: feature ``f = (outer * C + c) * inner + i``, which
  covers NCHW flatten (``c * HW + s``) and channels-last flatten (``s * C + c``) alike. A Reshape
  that splits the channel axis itself (channel shuffle, attention heads) is blocked.
* Resize/Upsample/Pad act on other axes (a ``sizes`` entry for the channel axis is rewritten);
  scaling or padding the channel axis is blocked.
* Shape of a mapped tensor is tracked so that reading the batch size does not block the channels,
  while reading the channel count does.
"""
from __future__ import annotations

import numpy as np

from ..analysis import ChannelMap
from ..registry import register
from . import split_axes
from ._util import (
    axes_from,
    has_input,
    mapped_input,
    normalize_axis,
    prod,
    split_parts,
    surviving_sizes,
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
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            split_axes.transpose(node, ctx, smap, _rank(ctx, node.inputs[0]))
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = _rank(ctx, node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None:
            if rank is None:
                ctx.block(xmap, f"rank of the input of {node.name} is unknown")
                return
            perm = list(reversed(range(rank)))
        ctx.set_map(node.outputs[0], xmap.moved(list(perm).index(xmap.axis)))

    def apply(self, node, ctx) -> None:
        pass


@register("Squeeze", "Unsqueeze")
class SqueezeHandler:
    """Removes or inserts size-1 axes around the channel axis."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            rank = _rank(ctx, node.inputs[0])
            try:
                axes = axes_from(node, ctx, 1)
            except ValueError:
                axes = None
            if rank is None or axes is None:
                ctx.block(smap, f"{node.op} {node.name} on a split channel axis without axes")
                return
            split_axes.squeeze(node, ctx, smap, axes, rank)
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

    def propagate(self, node, ctx) -> None:
        maps = [ctx.map(t) for t in node.inputs]
        if not any(m is not None for m in maps):
            return
        shapes = [ctx.shape(t) for t in node.inputs]
        where = f"Concat {node.name}"
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
    if has_input(node, 1):
        value = ctx.const(node.inputs[1])
        return None if value is None else [int(s) for s in np.asarray(value).reshape(-1)]
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    size = -(-dim // n)  # ceil, as opset 18 specifies for uneven splits
    sizes = [size] * (n - 1)
    return sizes + [dim - sum(sizes)]


@register("Split")
class SplitHandler:
    """Cuts the channel axis into independent parts (or passes other-axis splits through)."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap, rank = ctx.split_map(node.inputs[0]), _rank(ctx, node.inputs[0])
        if smap is not None:
            axis = None if rank is None else normalize_axis(int(node.attrs.get("axis", 0)), rank)
            if axis not in smap.axes:
                for out in node.outputs:
                    ctx.set_map(out, smap) if axis is not None else ctx.block(
                        smap, f"rank of the input of {node.name} is unknown")
                return
            dim = smap.labels.shape[smap.axes.index(axis)]
            sizes = _split_sizes(node, ctx, dim)
            if sizes is None or sum(sizes) != dim or len(sizes) != len(node.outputs):
                ctx.block(smap, f"split sizes of {node.name} are not constant or do not add up")
                return
            starts = np.cumsum([0, *sizes])
            split_axes.cut_level(node, ctx, smap, axis, list(zip(starts[:-1], starts[1:])))
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
    """(starts, ends, axes, steps) as lists, or None when not constant."""
    if ctx.opset < 10:
        starts = list(node.attrs.get("starts", []))
        ends = list(node.attrs.get("ends", []))
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    values = []
    for index in range(1, 5):
        if has_input(node, index):
            value = ctx.const(node.inputs[index])
            if value is None:
                return None
            values.append([int(v) for v in np.asarray(value).reshape(-1)])
        else:
            values.append(None)
    starts, ends, axes, steps = values
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    return starts, ends, axes, steps


def _clamp(index: int, dim: int) -> int:
    index = index + dim if index < 0 else index
    return max(0, min(index, dim))


@register("Slice")
class SliceHandler:
    """A contiguous channel range (cut from the rest), or a slice of other axes."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        if ctx.split_map(node.inputs[0]) is not None:
            self._propagate_split(node, ctx, ctx.split_map(node.inputs[0]))
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        rank = _rank(ctx, node.inputs[0])
        params = _slice_params(node, ctx)
        if params is None or rank is None:
            ctx.block(xmap, f"bounds of Slice {node.name} are not constant")
            return
        starts, ends, axes, steps = params
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis not in axes:
            ctx.set_map(node.outputs[0], xmap.passed())
            return
        k = axes.index(xmap.axis)
        if steps[k] != 1:
            ctx.block(xmap, f"Slice {node.name} steps over channels")
            return
        dim = len(xmap.labels)
        start, stop = _clamp(starts[k], dim), _clamp(ends[k], dim)
        stop = max(start, stop)
        ctx.cut(xmap.labels, start)
        ctx.cut(xmap.labels, stop)
        ctx.set_map(node.outputs[0], xmap.moved(xmap.axis, xmap.labels[start:stop]))

    @staticmethod
    def _propagate_split(node, ctx, smap) -> None:
        rank = _rank(ctx, node.inputs[0])
        params = _slice_params(node, ctx)
        if params is None or rank is None:
            ctx.block(smap, f"bounds of Slice {node.name} are not constant")
            return
        starts, ends, axes, steps = params
        axes = [normalize_axis(a, rank) for a in axes]
        cut = [k for k, a in enumerate(axes) if a in smap.axes]
        if not cut:
            ctx.set_map(node.outputs[0], smap)
            return
        if len(cut) > 1 or steps[cut[0]] != 1:
            ctx.block(smap, f"Slice {node.name} cuts a split channel axis in steps or twice")
            return
        k = cut[0]
        dim = smap.labels.shape[smap.axes.index(axes[k])]
        start = _clamp(starts[k], dim)
        split_axes.cut_level(node, ctx, smap, axes[k], [(start, max(start, _clamp(ends[k], dim)))])

    def apply(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None or ctx.keep(node.inputs[0]) is None:
            return
        rank = _rank(ctx, node.inputs[0])
        starts, ends, axes, _ = _slice_params(node, ctx)
        axes = [normalize_axis(a, rank) for a in axes]
        if xmap.axis not in axes:
            return
        k = axes.index(xmap.axis)
        dim = len(xmap.labels)
        start, stop = _clamp(starts[k], dim), max(_clamp(starts[k], dim), _clamp(ends[k], dim))
        new_start = _kept_count(ctx, xmap, 0, start)
        new_stop = new_start + _kept_count(ctx, xmap, start, stop)
        starts, ends = list(starts), list(ends)
        starts[k] = new_start
        if not (ends[k] >= dim):  # "to the end" stays "to the end"
            ends[k] = new_stop
        if ctx.opset < 10:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            ctx.set_input_value(node, 1, np.array(starts, dtype=np.int64))
            ctx.set_input_value(node, 2, np.array(ends, dtype=np.int64))


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


def _resolve_reshape(in_shape, spec) -> list[int] | None:
    out = []
    for i, s in enumerate(spec):
        if s == 0:
            if i >= len(in_shape) or in_shape[i] is None:
                return None
            out.append(in_shape[i])
        else:
            out.append(s)
    if -1 in out:
        known = prod(d for d in out if d != -1)
        if known == 0:
            return None
        out[out.index(-1)] = prod(in_shape) // known
    return out


@register("Reshape")
class ReshapeHandler:
    """Keeps, merges (repeat/tile labels) or splits (``split_axes``) the channel axis."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            split_axes.reshape_split_input(node, ctx, smap, ctx.shape(node.inputs[0]))
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        in_shape = ctx.shape(node.inputs[0])
        if split_axes.reshape_splits(node, ctx, xmap, in_shape):
            return
        spec = ctx.const(node.inputs[1])
        if in_shape is None or any(d is None for d in in_shape) or spec is None:
            ctx.block(xmap, f"Reshape {node.name} has a computed shape or unknown input dims")
            return
        out_shape = _resolve_reshape(in_shape, [int(s) for s in spec.reshape(-1)])
        if out_shape is None:
            ctx.block(xmap, f"cannot resolve the target shape of Reshape {node.name}")
            return
        result = _reshape_map(xmap, list(in_shape), out_shape)
        if result is None:
            ctx.block(xmap, f"Reshape {node.name} splits the channel axis")
            return
        ctx.set_map(node.outputs[0], result)

    def apply(self, node, ctx) -> None:
        if split_axes.reshape_apply(node, ctx):
            return
        out_map = ctx.map(node.outputs[0])
        keep = ctx.keep(node.outputs[0])
        if out_map is None or keep is None:
            return
        spec = [int(s) for s in ctx.const(node.inputs[1]).reshape(-1)]
        if spec[out_map.axis] in (-1, 0):
            if spec[out_map.axis] == 0 and ctx.map(node.inputs[0]).axis != out_map.axis:
                spec[out_map.axis] = len(keep)
            else:
                return
        else:
            spec[out_map.axis] = len(keep)
        ctx.set_input_value(node, 1, np.array(spec, dtype=np.int64))


def _reshape_map(cmap: ChannelMap, in_shape: list[int], out_shape: list[int]):
    """Map the channel axis through a reshape by matching blocks of equal products."""
    if prod(in_shape) != prod(out_shape) or in_shape[cmap.axis] <= 1:
        return None
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
                return None
        if i0 <= cmap.axis < i:
            block_out = [k for k in range(j0, min(j, len(out_shape))) if out_shape[k] != 1]
            big_in = [k for k in range(i0, min(i, len(in_shape))) if in_shape[k] != 1]
            if len(block_out) != 1:
                return None  # the channel axis is split (or vanished)
            if big_in == [cmap.axis]:
                return cmap.moved(block_out[0])
            return _merge_map(cmap, in_shape, i0, min(i, len(in_shape)), block_out[0])
    return None


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
        ctx.set_map(node.outputs[0], xmap.passed())

    @staticmethod
    def _channel_entry(node, ctx, xmap):
        """Returns ('scales'|'sizes'|'attr', index) when the channel axis is left alone."""
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
            sizes = ctx.const(node.inputs[3])
            if sizes is None:
                return None
            sizes = np.asarray(sizes).reshape(-1)
            if position is not None and sizes[position] != len(xmap.labels):
                return None
            return ("sizes", position)
        return None

    def apply(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        keep = ctx.keep(node.inputs[0])
        if xmap is None or keep is None:
            return
        kind, position = self._channel_entry(node, ctx, xmap)
        if kind == "sizes" and position is not None:
            sizes = np.array(ctx.const(node.inputs[3]), dtype=np.int64).reshape(-1)
            sizes[position] = len(keep)
            ctx.set_input_value(node, 3, sizes)


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
        smap = ctx.split_map(node.inputs[0])
        rank = _rank(ctx, node.inputs[0])
        if smap is not None and rank is not None:  # sizes read: those levels stay whole
            split_axes.shape(node, ctx, smap, rank)
            return
        if smap is not None:
            ctx.block(smap, f"rank of the input of Shape {node.name} is unknown")
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
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            rank, idx_rank = _rank(ctx, node.inputs[0]), _rank(ctx, node.inputs[1])
            if rank is None or idx_rank is None:
                ctx.block(smap, f"ranks around Gather {node.name} are unknown")
                return
            split_axes.gather(node, ctx, smap, rank, idx_rank)
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

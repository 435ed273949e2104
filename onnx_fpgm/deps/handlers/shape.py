"""Ops that move, join, resize or read the shape of the channel axis.

* Transpose/Squeeze/Unsqueeze move the channel axis; Gather on another axis moves it too.
* Concat on the channel axis places the inputs' channels side by side (unmapped inputs are fixed
  positions); on another axis it couples its inputs position by position.
* Split/Slice on the channel axis: see ``split_slice.py``.
* Flatten/Reshape: see ``reshape.py``. Tensors whose channel axis a Reshape split into levels
  (heads, shuffle groups) are handled by ``split_axes`` in every handler here.
* Resize/Upsample act on other axes (a ``sizes`` entry for the channel axis is rewritten);
  scaling the channel axis is blocked. Pad, and constants a Concat joins on the channel axis
  (zero padding of a short cut): see ``padding.py``.
* Shape of a mapped tensor is tracked so that reading the batch size does not block the channels,
  while reading the channel count does; a softmax scale computed from a split tensor's Shape is
  fed its original value by the rewrite (``computed_scale``).
"""
from __future__ import annotations

import numpy as np

from ..channels import ChannelMap
from ..computed_scale import freeze_scale
from ..registry import register
from ..shape_values import rewritable_source, shape_elements
from . import padding, split_axes, split_operands
from ._util import (
    axes_from,
    has_input,
    mapped_input,
    normalize_axis,
    rank_of,
    transpose_perm,
)


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
        perm = transpose_perm(node, rank_of(ctx, node.inputs[0]))
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

    accepts_split = True

    def data_inputs(self, node) -> list:
        """The tensors joined (com.microsoft QLinearConcat interleaves their parameters)."""
        return list(node.inputs)

    def propagate(self, node, ctx) -> None:
        inputs = self.data_inputs(node)
        if any(ctx.split_map(t) is not None for t in inputs):
            split_operands.concat(node, ctx, [t for t in inputs if t.name not in ctx.empty_cuts])
            return
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
            constants = padding.concat_constants(node, ctx, maps, shapes, axis)
            parts = []
            for i, (cmap, shape) in enumerate(zip(maps, shapes)):
                if cmap is not None:
                    parts.append(cmap.labels)
                elif i in constants:
                    parts.append(ctx.new_constant_atoms(shape[axis], where))
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
        out, rank = ctx.map(node.outputs[0]), rank_of(ctx, node.outputs[0])
        if node.op == "Concat" and out is not None and rank is not None and \
                out.axis == normalize_axis(int(node.attrs["axis"]), rank) and \
                ctx.keep(node.outputs[0]) is not None:
            padding.narrow_concat(node, ctx, out.axis)


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
            rank = rank_of(ctx, node.inputs[0])
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
        read, values = ctx.analysis.computed_scales.get(node.name, ((), []))
        if {axis for axis, _ in ctx.split_keeps(node.inputs[0])} & set(read):
            freeze_scale(node, values)  # a scale computed from a pruned size: its original


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
        rank = rank_of(ctx, node.inputs[0])
        idx_rank = rank_of(ctx, node.inputs[1])
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

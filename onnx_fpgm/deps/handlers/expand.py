"""Expand: a tensor broadcast to a shape (HF ``repeat_kv``, a class token expanded to the batch).

Channel algebra: ``y = Expand(x, s)`` aligns ``x`` and ``s`` from the right (rank
``R = max(rank x, len s)``); output dim ``j`` is x's dim where ``s[j]`` is 1 or equals it, and
``s[j]`` where x's dim is 1. The channel axis of x (or each level of a split channel axis, see
``blocks.py``) moves by ``R - rank x`` and keeps its labels, so ``y[..., c, ...]`` is channel c:

* its element of ``s`` is 1, or the channel count read by ``Shape`` from x (a split level's
  size read off a tensor of the same split: ``symbolic_sizes``): it follows the plan by itself;
* it is the channel count (the level's size): rewritten to the surviving count where it is
  stored (``shape_values``); a computed one keeps a level whole, and blocks plain channels;
* anything else (a channel axis of size 1 broadcast wider, a channel count sizing another
  axis) blocks.

A size-1 axis expanded to ``n`` (repeat_kv's new axis between the KV heads and the sequence) is
an ordinary axis: a later Reshape may merge it with a level (``split_axes``).
"""
from __future__ import annotations

import numpy as np

from ..blocks import SplitMap, require_whole
from ..registry import register
from ..shape_inference import unknown_dim
from ..shape_values import rewritable_source, shape_elements
from ..symbolic_sizes import reads_level, runtime_count
from ._util import rank_of


def _channel_elements(node, ctx, m, elements):
    """(shift, [(level position, element index or None when absent, size)]) for the input's
    channel-carrying axes given the target's ``elements`` (``shape_elements``), or why the
    expansion cannot be followed."""
    rank = rank_of(ctx, node.inputs[0])
    if rank is None or elements is None:
        return f"Expand {node.name}: unknown input rank or a target shape that is not a vector"
    shift = max(0, len(elements) - rank)
    axes = m.axes if isinstance(m, SplitMap) else (m.axis,)
    sizes = m.labels.shape if isinstance(m, SplitMap) else (len(m.labels),)
    found = []
    for position, (axis, size) in enumerate(zip(axes, sizes)):
        index = axis + shift - (max(rank, len(elements)) - len(elements))
        found.append((position, index if index >= 0 else None, int(size)))
    return shift, found


def _refine_output(node, ctx, elements) -> None:
    """Output dims onnx's inference left unknown (TorchScript computes the shape with Where),
    from the input's dims and the shape's known elements: later Reshapes need them."""
    out, dims = node.outputs[0], list(ctx.shape(node.inputs[0]) or ())
    rank = max(len(dims), len(elements))
    dims = [1] * (rank - len(dims)) + dims
    elements = [None] * (rank - len(elements)) + list(elements)
    found = [d if d != 1 or e is None else e.value for d, e in zip(dims, elements)]
    current = out.shape
    if current is None or len(current) != rank:
        current = [None] * rank
    unknown = [unknown_dim(c) for c in current]
    merged = [f if u and isinstance(f, int) and f >= 0 else c
              for c, f, u in zip(current, found, unknown)]
    if merged != list(current) or out.shape is None:
        out.shape = merged
        ctx.refined.add(out.name)


@register("Expand")
class ExpandHandler:
    """Moves the channel axis (or the levels of a split one) by the rank the shape adds."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        smap, cmap = ctx.split_map(node.inputs[0]), ctx.map(node.inputs[0])
        m = smap if smap is not None else cmap
        elements = shape_elements(node, 1, ctx)
        if m is None:
            if elements is not None and ctx.shape(node.inputs[0]) is not None:
                _refine_output(node, ctx, elements)  # rotary's cos/sin pass through Expand
            return
        found = _channel_elements(node, ctx, m, elements)
        if isinstance(found, str):
            ctx.block(m, found)
            return
        shift, axes = found
        channel_indices = {index for _, index, _ in axes}
        if any(e.channels is not None and i not in channel_indices
               for i, e in enumerate(elements)):
            ctx.block(m, f"channel count read by Expand {node.name} sizes another axis")
            return
        for position, index, size in axes:
            element = None if index is None else elements[index]
            if element is None or element.value == 1:
                continue
            if smap is None and element.labels is not None and element.factor == 1 and \
                    np.array_equal(element.labels, cmap.labels):
                continue  # the channel count read by Shape: it follows the plan by itself
            if smap is not None and element.read is not None and element.read[2] == 1 and \
                    reads_level(element, ctx) == (smap.record, smap.levels[position]):
                continue  # this level's size read by Shape (TorchScript's repeat_kv): follows
            if element.value is not None and (element.value != size or size == 1):
                ctx.block(m, f"Expand {node.name} broadcasts the channel axis")
                return
            if element.value is None or rewritable_source(node, 1, index, elements, ctx) is None:
                if smap is None:
                    ctx.block(m, f"the channel count in the shape of Expand {node.name} is "
                                 "computed (computed shape)")
                    return
                require_whole(ctx, smap, position, f"Expand {node.name} computes its size")
        _refine_output(node, ctx, elements)
        if smap is not None:
            ctx.set_map(node.outputs[0], smap.moved(a + shift for a in smap.axes))
        else:
            ctx.set_map(node.outputs[0], cmap.moved(cmap.axis + shift))

    def apply(self, node, ctx) -> None:
        smap, cmap = ctx.split_map(node.inputs[0]), ctx.map(node.inputs[0])
        m = smap if smap is not None else cmap
        if m is None:
            return
        elements = shape_elements(node, 1, ctx)
        for position, index, size in _channel_elements(node, ctx, m, elements)[1]:
            if index is None or elements[index].value != size or size == 1:
                continue
            kept = self._kept_count(node, ctx, smap, cmap, position)
            if smap is not None and elements[index].read is not None and \
                    runtime_count(elements[index], ctx) == kept:
                continue  # read by Shape off the shrunk level: it follows at run time
            if kept is not None and kept != size:
                current = shape_elements(node, 1, ctx)  # an earlier element may have copied
                ctx.set_shape_element(rewritable_source(node, 1, index, current, ctx), kept)

    @staticmethod
    def _kept_count(node, ctx, smap, cmap, position: int) -> int | None:
        """Surviving entries of the input's channel axis (or of level ``position``)."""
        if smap is None:
            keep = ctx.keep(node.inputs[0])
            return None if keep is None else len(keep)
        for axis, keep in ctx.split_keeps(node.inputs[0]):  # heads, or head dims
            if axis == smap.axes[position]:
                return len(keep)
        return None

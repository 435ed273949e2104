"""SplitToSequence -> SequenceAt: how torch.export (without its optimiser) writes ``chunk``.

A SplitToSequence on the channel axis cuts the channels into parts like Split; each part comes
out of a ``SequenceAt`` with a constant index. Any other reader of the sequence (a
ConcatFromSequence, SequenceLength, a loop) blocks the channels, since sequences carry no channel
map. The split sizes are rewritten to the surviving counts (a scalar chunk size becomes an
explicit list, since parts may now differ). Parts that end up of different sizes turn the pair
into Split -> Identity (see ``_as_split``).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..registry import register
from ._util import has_input, normalize_axis, split_parts, surviving_sizes


def _sizes(node, ctx, dim: int) -> list[int] | None:
    if not has_input(node, 1):
        return [1] * dim  # no split: chunks of size 1
    value = ctx.const(node.inputs[1])
    if value is None:
        return None
    value = np.asarray(value).reshape(-1) if np.asarray(value).ndim else np.asarray(value)
    if value.ndim == 0:
        chunk = int(value)
        n = -(-dim // chunk)
        return [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    return [int(v) for v in value]


@register("SplitToSequence")
class SplitToSequenceHandler:
    """Records one channel map per part; only SequenceAt readers with constant indices pass."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        shape = ctx.shape(node.inputs[0])
        seq = node.outputs[0]
        readers_ok = all(c.op == "SequenceAt" and ctx.const(c.inputs[1]) is not None
                         for c in seq.outputs)
        if shape is None or not readers_ok or not int(node.attrs.get("keepdims", 1)):
            ctx.block(xmap, f"sequence from {node.name} is read by something other than "
                            "SequenceAt with a constant index")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), len(shape))
        if axis != xmap.axis:
            sizes = None
            parts = None
        else:
            sizes = _sizes(node, ctx, len(xmap.labels))
            if sizes is None or sum(sizes) != len(xmap.labels):
                ctx.block(xmap, f"split sizes of {node.name} are not constant or do not add up")
                return
            parts = split_parts(ctx, xmap, sizes)
        for reader in seq.outputs:
            index = int(np.asarray(ctx.const(reader.inputs[1])).reshape(-1)[0])
            if parts is None:
                ctx.set_map(reader.outputs[0], xmap.passed())
            else:
                ctx.set_map(reader.outputs[0], parts[index])

    def apply(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None or ctx.keep(node.inputs[0]) is None:
            return
        shape = ctx.shape(node.inputs[0])
        if normalize_axis(int(node.attrs.get("axis", 0)), len(shape)) != xmap.axis:
            return
        value = np.array(surviving_sizes(ctx, xmap, _sizes(node, ctx, len(xmap.labels))),
                         dtype=np.int64)
        if len(set(value.tolist())) > 1:
            _as_split(node, ctx, value)
            return
        if has_input(node, 1):
            ctx.set_input_value(node, 1, value)
        else:
            ctx.add_input_value(node, value, f"{node.name}_split")


def _as_split(node, ctx, sizes: np.ndarray) -> None:
    """Rewrite SplitToSequence -> SequenceAt as Split -> Identity (names kept).

    Shape inference gives every element of a sequence one merged shape, so parts of different
    sizes would share a symbolic dim and onnxruntime reuses one's buffer for the other.
    """
    readers = list(node.outputs[0].outputs)
    parts = [gs.Variable(ctx.unique_name(f"{node.outputs[0].name}_{i}"))
             for i in range(len(sizes))]
    data = node.inputs[0]
    node.op = "Split"
    node.attrs = {"axis": int(node.attrs.get("axis", 0))}
    node.inputs.clear()
    node.inputs.append(data)
    if ctx.opset < 13:
        node.attrs["split"] = [int(s) for s in sizes]
    else:
        ctx.add_input_value(node, sizes, f"{node.name}_split")
    node.outputs.clear()
    node.outputs.extend(parts)
    for reader in readers:
        index = int(np.asarray(ctx.const(reader.inputs[1])).reshape(-1)[0]) % len(sizes)
        reader.op = "Identity"
        reader.attrs = {}
        reader.inputs.clear()
        reader.inputs.append(parts[index])


@register("SequenceAt")
class SequenceAtHandler:
    """Its output map is set by the SplitToSequence that made the sequence."""

    def propagate(self, node, ctx) -> None:
        pass

    def apply(self, node, ctx) -> None:
        pass

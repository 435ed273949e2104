"""Constant channels joined on the channel axis: padding that widens a short cut.

MediaPipe's BlazeFace widens a residual block by appending zero channels to its short cut before
the Add: ``Concat(x, zeros)`` with the zeros from a ``ConstantOfShape`` (of a stored or a
computed shape) or a stored tensor, or, as tf2onnx writes ``tf.pad``, a constant-mode ``Pad``
on the channel axis. Such channels are constants: they get atoms of their own
(``AnalysisContext.new_constant_atoms``) instead of fixed positions, so the main-branch channels
they meet at the Add form their own classes (prunable: removing one removes a padding channel)
while the channels that meet ``x`` stay coupled with ``x``. The rewrite shrinks the padding to
the channels kept: the ``ConstantOfShape``'s shape element, the stored tensor's slice, or the
``Pad``'s pads.

``Pad`` on other axes passes channels through; reflect/edge padding of channels copies real
channels and blocks, as does a computed pad width.
"""
from __future__ import annotations

import numpy as np

from ..channels import ChannelMap
from ..registry import register
from ..shape_values import rewritable_source, shape_elements
from ._util import axes_from, has_input, normalize_axis, rank_of


def constant_width(tensor, axis: int, ctx) -> int | None:
    """The width on ``axis`` of a constant that the rewrite can narrow there, or None.

    A ``ConstantOfShape`` whose shape element ``axis`` is a known, rewritable value (stored, or
    a constant within a computed shape), or any constant value (stored, or folded: the rewrite
    then writes a narrowed copy).
    """
    producer = _constant_of_shape(tensor)
    if producer is not None:
        elements = shape_elements(producer, 0, ctx)
        if elements is not None and axis < len(elements) and elements[axis].known and \
                elements[axis].channels is None and \
                rewritable_source(producer, 0, axis, elements, ctx) is not None:
            return elements[axis].value
        return None
    value = ctx.const(tensor)
    if value is None or value.ndim <= axis:
        return None
    return int(value.shape[axis])


def narrow(node, index: int, axis: int, keep: np.ndarray, ctx) -> None:
    """Keep only the constant channels ``keep`` of ``node.inputs[index]`` (see
    ``constant_width``); a ``ConstantOfShape`` read by others is copied for ``node`` first."""
    producer = _constant_of_shape(node.inputs[index])
    if producer is None:
        ctx.slice_input(node, index, axis, keep)
        return
    producer = ctx.private_producer(node, index, producer)
    elements = shape_elements(producer, 0, ctx)
    ctx.set_shape_element(rewritable_source(producer, 0, axis, elements, ctx), len(keep))


def _constant_of_shape(tensor):
    producers = getattr(tensor, "inputs", None)
    if not producers or len(producers) != 1:
        return None
    producer = producers[0]
    if producer.op != "ConstantOfShape" or (producer.domain or "") not in ("", "ai.onnx") or \
            not has_input(producer, 0):
        return None
    return producer


def concat_constants(node, ctx, maps: list, shapes: list, axis: int) -> list[int]:
    """Indices of the inputs of a channel-axis Concat that are constants the rewrite narrows."""
    if node.op != "Concat":
        return []
    return [i for i, (cmap, shape) in enumerate(zip(maps, shapes))
            if cmap is None and shape[axis] is not None and
            constant_width(node.inputs[i], axis, ctx) == shape[axis]]


def narrow_concat(node, ctx, axis: int) -> None:
    """Narrow each constant input of a channel-axis Concat to the channels the plan keeps."""
    out = ctx.map(node.outputs[0])
    kept = ctx.kept_mask(out.labels)
    offset = 0
    for index, tensor in enumerate(node.inputs):
        cmap = ctx.map(tensor)
        width = len(cmap.labels) if cmap is not None else ctx.shape(tensor)[axis]
        part = slice(offset, offset + width)
        offset += width
        if cmap is None and width and (out.labels[part] >= 0).all() and not kept[part].all():
            narrow(node, index, axis, np.flatnonzero(kept[part]).astype(np.int64), ctx)


@register("Pad")
class PadHandler:
    """Padding of non-channel axes passes channels through; constant padding of the channel
    axis adds constant channels (module docstring)."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        found = _pads(node, ctx)
        if found is None:
            ctx.block(xmap, f"pads of Pad {node.name} are not constant")
            return
        pads, axes = found
        if xmap.axis not in axes:
            ctx.set_map(node.outputs[0], xmap.passed())
            return
        k = axes.index(xmap.axis)
        before, after = pads[k], pads[k + len(axes)]
        if before == after == 0:
            ctx.set_map(node.outputs[0], xmap.passed())
            return
        if before < 0 or after < 0 or node.attrs.get("mode", "constant") != "constant" or \
                not _constant_value(node, ctx):
            ctx.block(xmap, f"Pad {node.name} pads the channel axis (not with a constant)")
            return
        where = f"Pad {node.name}"
        labels = np.concatenate([ctx.new_constant_atoms(before, where), xmap.labels,
                                 ctx.new_constant_atoms(after, where)])
        ctx.set_map(node.outputs[0], ChannelMap(xmap.axis, labels))

    def apply(self, node, ctx) -> None:
        out, xmap = ctx.map(node.outputs[0]), ctx.map(node.inputs[0])
        if out is None or xmap is None or len(out.labels) == len(xmap.labels) or \
                ctx.keep(node.outputs[0]) is None:
            return
        pads, axes = _pads(node, ctx)
        k = axes.index(out.axis)
        kept = ctx.kept_mask(out.labels)
        before, after = pads[k], pads[k + len(axes)]
        pads[k] = int(np.count_nonzero(kept[:before]))
        pads[k + len(axes)] = int(np.count_nonzero(kept[len(kept) - after:]))
        if ctx.opset < 11:
            node.attrs["pads"] = pads
        else:
            ctx.set_input_value(node, 1, np.array(pads, dtype=np.int64))


def _pads(node, ctx) -> tuple[list[int], list[int]] | None:
    """(pads, normalised axes) when both are constant."""
    rank = rank_of(ctx, node.inputs[0])
    pads = node.attrs.get("pads") if ctx.opset < 11 else (
        ctx.const(node.inputs[1]) if has_input(node, 1) else None)
    if pads is None or rank is None:
        return None
    try:
        axes = axes_from(node, ctx, 3) or list(range(rank))
    except ValueError:
        return None
    return [int(p) for p in np.asarray(pads).reshape(-1)], [normalize_axis(a, rank) for a in axes]


def _constant_value(node, ctx) -> bool:
    """The padding value is a constant (absent: zero)."""
    if ctx.opset < 11 or not has_input(node, 2):
        return True
    value = ctx.const(node.inputs[2])
    return value is not None and np.asarray(value).size == 1

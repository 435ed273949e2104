"""Small helpers shared by handlers (axis arithmetic, attribute/input reading)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from ..channels import ChannelMap


def normalize_axis(axis: int, rank: int) -> int:
    """Negative axes count from the end, as ONNX specifies."""
    return axis + rank if axis < 0 else axis


def axes_from(node: gs.Node, ctx, input_index: int, attr: str = "axes") -> list[int] | None:
    """Axes given as an attribute (older opsets) or a constant input (newer); None if absent.

    Raises ValueError when the axes input exists but is not constant.
    """
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) > input_index and node.inputs[input_index] is not None and \
            node.inputs[input_index].name:
        value = ctx.const(node.inputs[input_index])
        if value is None:
            raise ValueError(f"{attr} of {node.name} are computed at run time")
        return [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def transpose_perm(node: gs.Node, rank: int | None) -> list[int] | None:
    """Transpose's ``perm`` (reversed axes by default); None when that needs an unknown rank."""
    perm = node.attrs.get("perm")
    if perm is None:
        return None if rank is None else list(reversed(range(rank)))
    return list(perm)


def has_input(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None and bool(
        node.inputs[index].name
    )


def prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result


def split_parts(ctx, cmap, sizes: list[int]) -> list:
    """Cut ``cmap``'s channels into consecutive parts of ``sizes`` (each cut recorded)."""
    parts, start = [], 0
    for size in sizes:
        ctx.cut(cmap.labels, start)
        parts.append(cmap.moved(cmap.axis, cmap.labels[start:start + size]))
        start += size
    return parts


def surviving_sizes(ctx, cmap, sizes: list[int]) -> list[int]:
    """How many channels of each consecutive part of ``sizes`` survive the plan."""
    bounds = np.cumsum([0, *sizes])
    kept = ctx.kept_mask(cmap.labels)
    return [int(np.count_nonzero(kept[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def mapped_input(node: gs.Node, ctx):
    """(channel map, static shape) of input 0.

    None when the input carries no channels of ours, or when its rank is unknown (then the
    channels are blocked, since the handler cannot place the channel axis).
    """
    xmap = ctx.map(node.inputs[0])
    if xmap is None:
        return None
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        ctx.block(xmap, f"rank of the input of {node.op} {node.name} is unknown")
        return None
    return xmap, shape


def rank_of(ctx, tensor) -> int | None:
    """The tensor's rank when its shape is known."""
    shape = ctx.shape(tensor)
    return None if shape is None else len(shape)


def kept_count(ctx, cmap: ChannelMap, start: int, stop: int) -> int:
    """How many of the map's positions ``start .. stop`` the plan keeps."""
    return int(np.count_nonzero(ctx.kept_mask(cmap.labels[start:stop])))


def pass_like_input(node, ctx, xmap) -> None:
    """Output 0 carries input 0's channels (``xmap``) and its shape: onnx does not infer
    com.microsoft ops, so the shape is recorded here for the analysis to infer onward."""
    record_shape(ctx, node.outputs[0], node.inputs[0].shape, node.inputs[0].dtype)
    ctx.set_map(node.outputs[0], xmap.passed())


def record_shape(ctx, tensor: gs.Tensor | None, shape, dtype=None) -> None:
    """Give ``tensor`` the ``shape`` (and element type) its handler knows where inference left
    it unknown (onnx does not infer com.microsoft ops; onnxruntime's run may not have reached
    it), so the layers after a fused op still see their input's rank."""
    if tensor is None or not tensor.name or shape is None:
        return
    if tensor.shape is None:
        tensor.shape = list(shape)
        ctx.refined.add(tensor.name)
    if tensor.dtype is None and dtype is not None:
        tensor.dtype = dtype

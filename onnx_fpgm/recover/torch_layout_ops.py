"""The shape, layout and constant ops of the differentiable executor (see ``torch_ops``)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .torch_ops import UnsupportedForm, axis_index, ints, op, torch_dtype


# ---- shapes and layout ----
@op("Flatten")
def _flatten(inputs, attrs):
    x = inputs[0]
    axis = axis_index(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


@op("Reshape")
def _reshape(inputs, attrs):
    x, shape = inputs[0], ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(inputs, attrs):
    x = inputs[0]
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


@op("Concat")
def _concat(inputs, attrs):
    parts = [t for t in inputs if t is not None]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in parts])
    return torch.cat([t.to(dtype) for t in parts],
                     dim=axis_index(attrs["axis"], parts[0].dim()))


@op("Split")
def _split(inputs, attrs, n_outputs=None):
    x = inputs[0]
    axis = axis_index(attrs.get("axis", 0), x.dim())
    sizes = attrs.get("split")
    if sizes is None and len(inputs) > 1 and inputs[1] is not None:
        sizes = ints(inputs[1])
    if sizes is None:
        n = attrs.get("num_outputs", attrs["_n_outputs"])
        each = math.ceil(x.shape[axis] / n)
        sizes = [min(each, x.shape[axis] - i * each) for i in range(n)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@op("Slice")
def _slice(inputs, attrs):
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis, size = axis_index(axis, x.dim()), x.shape[axis_index(axis, x.dim())]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(end, start), step)
        else:  # a reversed slice: take it forward on the flipped axis
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            flips.append(axis)
            index[axis] = slice(size - 1 - start, max(size - 1 - end, size - 1 - start), -step)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@op("Squeeze")
def _squeeze(inputs, attrs):
    x = inputs[0]
    axes = attrs.get("axes")
    if axes is None and len(inputs) > 1 and inputs[1] is not None:
        axes = ints(inputs[1])
    if axes is None:
        return x.squeeze()
    keep = [d for i, d in enumerate(x.shape) if i not in {axis_index(a, x.dim()) for a in axes}]
    return x.reshape(keep)


@op("Unsqueeze")
def _unsqueeze(inputs, attrs):
    x = inputs[0]
    axes = attrs.get("axes")
    if axes is None:
        axes = ints(inputs[1])
    rank = x.dim() + len(axes)
    for axis in sorted(axis_index(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


@op("Pad")
def _pad(inputs, attrs):
    x = inputs[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = attrs.get("pads")
    if pads is None:
        pads = ints(inputs[1])
    value = attrs.get("value", 0.0)
    if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel():
        value = float(inputs[2].reshape(-1)[0])
    axes = list(range(x.dim()))
    if len(inputs) > 3 and inputs[3] is not None:
        axes = [axis_index(a, x.dim()) for a in ints(inputs[3])]
    n = len(axes)
    per_axis = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    last = max((a for a, p in per_axis.items() if any(p)), default=None)
    if last is None:
        return x
    flat = []
    for axis in range(x.dim() - 1, min(per_axis) - 1, -1):
        flat += list(per_axis.get(axis, (0, 0)))
    if mode == "constant":
        return F.pad(x, flat, value=value)
    if mode not in ("reflect", "edge"):
        raise UnsupportedForm(f"Pad mode {mode}")
    if any(per_axis.get(a, (0, 0)) != (0, 0) for a in (0, 1)):
        raise UnsupportedForm(f"Pad mode {mode} on the batch or channel axis")
    return F.pad(x, flat[:2 * (x.dim() - 2)], mode="reflect" if mode == "reflect" else "replicate")


@op("Resize", "Upsample")
def _resize(inputs, attrs):
    x = inputs[0]
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    coord = attrs.get("coordinate_transformation_mode", b"half_pixel")
    coord = coord.decode() if isinstance(coord, bytes) else coord
    scales = sizes = None
    tensors = [t for t in inputs[1:]]
    if attrs.get("_op") == "Upsample":
        scales = [float(s) for s in (attrs.get("scales") or tensors[0].reshape(-1).tolist())]
        coord = "asymmetric"
    else:
        if len(tensors) > 1 and tensors[1] is not None and tensors[1].numel():
            scales = [float(s) for s in tensors[1].reshape(-1).tolist()]
        if len(tensors) > 2 and tensors[2] is not None and tensors[2].numel():
            sizes = ints(tensors[2])
    if attrs.get("axes") is not None:
        raise UnsupportedForm("Resize with axes")
    if sizes is not None:
        out = sizes[2:]
    elif scales is not None:
        if scales[:2] != [1.0, 1.0]:
            raise UnsupportedForm("Resize scaling the batch or channel axis")
        out = [math.floor(d * s) for d, s in zip(x.shape[2:], scales[2:])]
    else:
        raise UnsupportedForm("Resize without scales or sizes")
    if mode == "nearest":
        nearest = attrs.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        # torch's nearest is asymmetric + floor; at whole-number upscales half-pixel centres
        # with floor/round rounding (and asymmetric with round_prefer_floor) pick the same pixels
        whole = all(o % i == 0 for o, i in zip(out, x.shape[2:]))
        same = (coord == "asymmetric" and nearest in ("floor", "round_prefer_floor" if whole
                                                       else "floor")) or (
            whole and coord in ("half_pixel", "pytorch_half_pixel") and nearest != "ceil")
        if not same:
            raise UnsupportedForm(f"Resize nearest with {coord}/{nearest} at scales {scales}")
        return F.interpolate(x, size=out, mode="nearest")
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        if coord == "pytorch_half_pixel" and any(o == 1 for o in out):
            raise UnsupportedForm("Resize pytorch_half_pixel to size 1")
        linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(out)]
        return F.interpolate(x, size=out, mode=linear, align_corners=coord == "align_corners",
                             antialias=False)
    raise UnsupportedForm(f"Resize mode {mode} with {coord}")


# ---- constants and shape values ----
@op("Shape")
def _shape(inputs, attrs):
    shape = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return torch.tensor(shape[start:end], dtype=torch.int64)


@op("Gather")
def _gather(inputs, attrs):
    x, index = inputs
    axis = axis_index(attrs.get("axis", 0), x.dim())
    index = torch.where(index < 0, index + x.shape[axis], index)
    return x.index_select(axis, index.reshape(-1)).reshape(  # a tuple: () for a scalar
        (*x.shape[:axis], *index.shape, *x.shape[axis + 1:]))


@op("Cast")
def _cast(inputs, attrs):
    return inputs[0].to(torch_dtype(attrs["to"]))


@op("ConstantOfShape")
def _constant_of_shape(inputs, attrs):
    value = attrs.get("value")
    fill = torch.zeros(1) if value is None else value
    return fill.reshape(-1)[0].expand(ints(inputs[0])).clone()


@op("Expand")
def _expand(inputs, attrs):
    x, shape = inputs[0], ints(inputs[1])
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


@op("Range")
def _range(inputs, attrs):
    start, limit, delta = (t.reshape(()) for t in inputs)
    return torch.arange(start, limit, delta)


@op("Equal")
def _equal(inputs, attrs):
    return torch.eq(inputs[0], inputs[1])


@op("Where")
def _where(inputs, attrs):
    return torch.where(inputs[0], inputs[1], inputs[2])



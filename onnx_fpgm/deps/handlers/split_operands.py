"""Split channel axes meeting other operands: element-wise ops (per-head constants, joins of
two split tensors), Concat, and MatMul of two activations (attention); the algebra is
``split_axes``'s.

* An element-wise operand that is not ours (rotary's cos/sin, computed from position ids)
  spans levels that hold no heads (``head_dim``): a level it broadcasts over (size 1: the
  heads) may lose entries; on a level it spans, head dims may go, and the rewrite reads it
  through a Gather of the dims kept.
* Concat on a level axis (rotate_half's ``cat(-x2, x1)`` on ``head_dim``) joins pieces of that
  level, which holds no heads (each piece may lose head dims of its own); on another axis it joins split tensors position by position (they
  are coupled), and an input that is not ours keeps the levels it spans whole (a cache), unless
  it is a cache input whose interface may change (``interface.py``): it takes their channels.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..blocks import require_contracted, require_free, require_whole
from ..channels import ChannelMap
from ..interface import joins_cache
from ._util import normalize_axis

# ---- element-wise -----------------------------------------------------------------------------


def broadcast(node, ctx) -> bool:
    """An element-wise op over one split input and constants/broadcast inputs; True if handled."""
    inputs = [t for t in node.inputs if t is not None and t.name]
    splits = [ctx.split_map(t) for t in inputs]
    if not any(s is not None for s in splits):
        return False
    where = f"{node.op} {node.name}"
    shapes = [ctx.shape(t) for t in inputs]
    # the widest split sets the output (a per-head statistic, one entry on head_dim, broadcasts)
    ref_index = max((i for i, s in enumerate(splits) if s is not None),
                    key=lambda i: splits[i].labels.size)
    ref = splits[ref_index]
    if any(s is None for s in shapes):
        ctx.block(ref, f"input rank of {where} is unknown")
        return True
    rank_out = max(len(s) for s in shapes)
    ref_axes = [a + rank_out - len(shapes[ref_index]) for a in ref.axes]
    for tensor, shape, smap in zip(inputs, shapes, splits):
        offset = rank_out - len(shape)
        if smap is not None:
            axes = [a + offset for a in smap.axes]
            if smap is not ref and (axes != ref_axes or not _lines_up(smap, ref)):
                ctx.block(ref, f"{where} joins split channel axes that do not line up")
                ctx.block(smap, f"{where} joins split channel axes that do not line up")
                return True
            if smap is not ref:
                ctx.couple(np.broadcast_to(smap.labels, ref.labels.shape).reshape(-1),
                           ref.flat(), where)
            continue
        if ctx.map(tensor) is not None:
            ctx.block(ref, f"{where} joins a split channel axis with plain channels")
            ctx.block(ctx.map(tensor), f"{where} joins a split channel axis with plain channels")
            return True
        if ctx.const(tensor) is None:  # not ours: the levels it spans hold no heads; it is
            for position, axis in enumerate(ref_axes):  # gathered on the head dims kept
                if axis - offset >= 0 and shape[axis - offset] != 1:
                    ctx.split_records[ref.record].whole.setdefault(
                        ref.levels[position], f"{where} mixes it with an activation not ours")
    ctx.set_map(node.outputs[0], ref.moved(ref_axes))
    return True


def _lines_up(smap, ref) -> bool:
    """``smap`` has ref's levels, each with ref's entries or (a per-head statistic over a whole
    level of the same split) one entry that broadcasts."""
    if smap.labels.shape == ref.labels.shape:
        return True
    return smap.record == ref.record and smap.levels == ref.levels and all(
        n in (m, 1) for n, m in zip(smap.labels.shape, ref.labels.shape))


def broadcast_apply(node, ctx) -> bool:
    """Slice constants of an element-wise op on every level of its split output that shrinks
    (the heads, the head dims)."""
    smap = ctx.split_map(node.outputs[0])
    if smap is None:
        return False
    rank_out = len(ctx.shape(node.outputs[0]))
    for axis, keep in ctx.split_keeps(node.outputs[0]):
        width = smap.labels.shape[smap.axes.index(axis)]
        for index, tensor in enumerate(node.inputs):
            if tensor is None or not tensor.name or ctx.split_map(tensor) is not None:
                continue
            value = ctx.const(tensor)
            shape = value.shape if value is not None else ctx.shape(tensor)
            local = axis - (rank_out - len(shape))
            if local < 0 or shape[local] != width or width < 2:
                continue
            if value is not None:
                ctx.slice_input(node, index, local, keep)
            else:  # computed (rotary's cos/sin): read on the head dims kept
                ctx.gather_input(node, index, local, keep)
    return True


def concat(node, ctx, inputs) -> None:
    """Concat of split tensors (see the module docstring); ``inputs``: the tensors joined."""
    where = f"{node.op} {node.name}"
    splits = [ctx.split_map(t) for t in inputs]
    ref = next(s for s in splits if s is not None)
    shapes = [ctx.shape(t) for t in inputs]
    if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        ctx.block(ref, f"input ranks of {where} are unknown or differ")
        return
    axis = normalize_axis(int(node.attrs["axis"]), len(shapes[0]))
    for tensor, smap in zip(inputs, splits):
        if ctx.map(tensor) is not None or (smap is not None and (
                smap.record != ref.record if axis in ref.axes else
                smap.axes != ref.axes or smap.labels.shape != ref.labels.shape)):
            for m in (*splits, ctx.map(tensor)):
                ctx.block(m, f"{where} joins a split channel axis with channels that do not "
                             "line up")
            return
    position = ref.position(axis)
    if position is not None:  # pieces of one level, put back together: that level stays whole
        if any(s is None or s.axes != ref.axes or s.levels != ref.levels for s in splits):
            ctx.block(ref, f"{where} joins a split channel axis with channels not ours")
            return
        # not the heads; its entries may go as head dims (each piece loses its own)
        ctx.split_records[ref.record].whole.setdefault(ref.levels[position],
                                                       f"{where} joins pieces of it")
        labels = np.concatenate([s.labels for s in splits], axis=position)
        ctx.set_map(node.outputs[0], replace(ref, labels=labels))
        return
    for tensor, smap, shape in zip(inputs, splits, shapes):
        if smap is None and joins_cache(node, tensor, ref.axes, ctx):
            # a past cache holds the channels it is joined with: under the flag its heads and
            # head dims change with the interface (checked on the kept ones: resized_interface)
            ctx.set_map(tensor, ref)
            ctx.changeable_outputs.add(node.outputs[0].name)
        elif smap is None:  # e.g. a past key/value cache: its heads cannot be removed
            for k, level_axis in enumerate(ref.axes):
                if shape[level_axis] != 1:
                    require_whole(ctx, ref, k, f"{where} joins it with an input not ours")
        elif smap is not ref:
            ctx.couple(ref.flat(), smap.flat(), where)
    ctx.set_map(node.outputs[0], ref)


# ---- attention: MatMul of two activations -----------------------------------------------------


def _entries(ctx, tensor):
    """[(tensor axis, split or plain map, level position or None)] of one MatMul operand."""
    smap, cmap = ctx.split_map(tensor), ctx.map(tensor)
    found = []
    if smap is not None:
        found = [(axis, smap, k) for k, axis in enumerate(smap.axes)]
    elif cmap is not None:
        found = [(cmap.axis, cmap, None)]
    return found


def matmul_activations(node, ctx) -> None:
    """``A @ B`` of two activations: pair heads on batch axes; contracted levels are not the
    heads (they pair their entries, see ``_contract``)."""
    a, b = node.inputs[0], node.inputs[1]
    sa, sb = ctx.shape(a), ctx.shape(b)
    where = f"MatMul {node.name}"
    maps = [m for t in (a, b) for m in (ctx.split_map(t), ctx.map(t)) if m is not None]
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        for m in maps:
            ctx.block(m, f"{where} multiplies activations of unknown rank")
        return
    ra, rb = len(sa), len(sb)
    rank = max(ra, rb)
    out: dict[int, tuple] = {}
    batch: dict[int, list[tuple]] = {}
    contracted_levels: list[tuple] = []
    for tensor, r, contracted, kept_axis, kept_out in ((a, ra, ra - 1, ra - 2, rank - 2),
                                                       (b, rb, rb - 2, rb - 1, rank - 1)):
        for axis, m, k in _entries(ctx, tensor):
            if axis == contracted:
                if k is None:
                    ctx.block(m, f"{where} contracts channels of two activations")
                    continue
                contracted_levels.append((m, k))
            elif axis == kept_axis:
                out[kept_out] = (m, k)
            else:
                batch.setdefault(axis + rank - r, []).append((tensor, m, k))
    for out_axis, entries in batch.items():
        if len(entries) == 1:  # the other operand must broadcast (size 1) on this axis
            tensor = b if entries[0][0] is a else a
            shape = sb if tensor is b else sa
            local = out_axis - (rank - len(shape))
            if local >= 0 and shape[local] != 1:
                ctx.block(entries[0][1], f"{where} pairs heads with an activation not ours")
                continue
        reps = []
        for _, m, k in entries:
            if k is None:
                reps.append(m.labels)
            else:
                require_free(ctx, m, k, f"{where} pairs heads", heads=True)
                reps.append(m.representative(k))
        if len({len(r) for r in reps}) != 1:
            for _, m, _k in entries:
                ctx.block(m, f"{where} pairs head axes of different sizes")
            continue
        for rep in reps[1:]:
            ctx.couple_heads(reps[0], rep, where)
        out[out_axis] = entries[-1][1:]
    _contract(ctx, contracted_levels, where)
    _set_matmul_output(node, ctx, out)


def _contract(ctx, levels: list[tuple], where: str) -> None:
    """Levels on the contracted axis: never the heads; one level of each operand, of one
    size (``q @ k^T`` over ``head_dim``), pairs its entries (they may go together, see
    ``head_dims``); any other contracted level stays whole."""
    if len(levels) == 2 and levels[0][0].labels.shape[levels[0][1]] == \
            levels[1][0].labels.shape[levels[1][1]]:
        (ma, ka), (mb, kb) = levels
        require_contracted(ctx, ma, ka, mb, kb, f"{where} contracts it")
        return
    for m, k in levels:
        require_whole(ctx, m, k, f"{where} contracts it")


def _set_matmul_output(node, ctx, out: dict[int, tuple]) -> None:
    if not out:
        return
    splits = {id(m): m for m, k in out.values() if k is not None}
    for m in splits.values():  # one operand's split covers every channel-carrying axis
        if all((mm is m) or (k is None) for mm, k in out.values()) and \
                len([1 for mm, _ in out.values() if mm is m]) == len(m.axes):
            axes = {k: axis for axis, (mm, k) in out.items() if mm is m}
            ctx.set_map(node.outputs[0], m.moved(axes[k] for k in range(len(m.axes))))
            return
    if len(out) == 1:
        (axis, (m, k)), = out.items()
        labels = m.labels if k is None else ctx.head_labels(m, k, f"MatMul {node.name}")
        ctx.set_map(node.outputs[0], ChannelMap(axis, labels))
        return
    for m, _ in out.values():
        ctx.block(m, f"MatMul {node.name} mixes channels of two operands in its product")

"""Handlers' rules for split channel axes (attention heads, channel shuffle); see ``blocks.py``.

Channel algebra, for a split tensor with levels ``(n_1, ..., n_k)`` on tensor axes ``a_1..a_k``:

* Reshape of a channel axis ``C`` into consecutive axes ``(n_1, ..., n_k)`` (size-1 axes aside)
  creates the split: ``labels.reshape(n_1, ..., n_k)``. A Reshape that merges the level axes
  (adjacent, in any order) back into one axis ends it: the labels are read in the tensor's order,
  so ``(C/g, g)`` after a shuffle's Transpose gives the shuffled channel order. A Reshape that
  leaves every level axis alone in its block only moves them (e.g. a leading batch axis); a
  level merged with neighbouring axes that hold no level (repeat_kv's expanded ``n_rep`` axis:
  ``(h_kv, n_rep) -> h``) repeats each of its entries over the merged positions, so query heads
  pair with the KV head they read.
* Transpose/Squeeze/Unsqueeze move the level axes; Gather with a constant scalar index on a level
  picks one entry of it (that level stays whole: ``qkv[0]``); Gather elsewhere moves them.
* Element-wise ops pass the split through; a constant operand with a level's full extent is
  sliced on the free level (per-head biases). Softmax over a non-level axis passes.
* MatMul of two activations ``A @ B`` (attention): a level on a contracted axis is not the
  heads (``head_dim``: its entries pair between A and B, see ``head_dims``); levels on broadcast batch axes are paired between A and B and must be the free
  level (heads); levels on A's rows or B's columns pass to the product.

Rewrites: Reshape targets get each level's surviving count (the heads, and ``head_dim`` when
head dims go, see ``head_dims``; ``-1`` entries are left to infer it), constants are sliced;
nothing else changes (the softmax scale stays the original ``1/sqrt(head_dim)``; one computed
from a Shape of the split tensor is fed its original value, see ``computed_scale``).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...errors import RewriteError
from ..blocks import SplitMap, drop_level, new_split, require_free, require_whole
from ..channels import ChannelMap
from ..computed_scale import computed_scale
from ..repeats import repeat_copies
from ..reshape_sizes import named_dims, resolve_reshape_target
from ..shape_values import (
    rewritable_source,
    shape_elements,
    symbolic_dims,
)
from ..symbolic_sizes import reads_level, reads_follow, runtime_count
from ._util import axes_from, normalize_axis, prod, transpose_perm


def _rank(ctx, tensor) -> int | None:
    shape = ctx.shape(tensor)
    return None if shape is None else len(shape)


def transpose(node, ctx) -> None:
    smap = ctx.split_map(node.inputs[0])
    perm = transpose_perm(node, _rank(ctx, node.inputs[0]))
    if perm is None:
        ctx.block(smap, f"rank of the input of {node.name} is unknown")
        return
    ctx.set_map(node.outputs[0], smap.moved(perm.index(a) for a in smap.axes))


def squeeze(node, ctx) -> None:
    """Squeeze/Unsqueeze: levels move; a squeezed one-entry level (an unbound part) is dropped."""
    smap, rank = ctx.split_map(node.inputs[0]), _rank(ctx, node.inputs[0])
    try:
        axes = axes_from(node, ctx, 1)
    except ValueError:
        axes = None
    if rank is None or axes is None:
        ctx.block(smap, f"{node.op} {node.name} on a split channel axis without axes")
        return
    if node.op == "Squeeze":
        axes = [normalize_axis(a, rank) for a in axes]
        for position, axis in reversed(list(enumerate(smap.axes))):
            if axis not in axes:
                continue
            if smap.labels.shape[position] != 1:
                ctx.block(smap, f"Squeeze {node.name} removes a level of a split channel axis")
                return
            require_whole(ctx, smap, position, f"Squeeze {node.name} drops a one-entry part")
            smap = drop_level(smap, position, 0, lambda a: a)
        ctx.set_map(node.outputs[0], smap.moved(a - sum(s < a for s in axes) for a in smap.axes))
        return
    out_rank = rank + len(axes)
    inserted = sorted(normalize_axis(a, out_rank) for a in axes)
    kept_positions = [i for i in range(out_rank) if i not in inserted]
    ctx.set_map(node.outputs[0], smap.moved(kept_positions[a] for a in smap.axes))


def split(node, ctx, sizes_of) -> None:
    """Split of a split tensor: on a level it cuts that level (kept whole); elsewhere it passes."""
    smap, rank = ctx.split_map(node.inputs[0]), _rank(ctx, node.inputs[0])
    if rank is None:
        ctx.block(smap, f"rank of the input of {node.name} is unknown")
        return
    axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
    if axis not in smap.axes:
        for out in node.outputs:
            ctx.set_map(out, smap)
        return
    dim = smap.labels.shape[smap.axes.index(axis)]
    sizes = sizes_of(dim)
    if sizes is None or sum(sizes) != dim or len(sizes) != len(node.outputs):
        ctx.block(smap, f"split sizes of {node.name} are not constant or do not add up")
        return
    starts = np.cumsum([0, *sizes])
    cut_level(node, ctx, smap, axis, list(zip(starts[:-1], starts[1:])))


def slice_(node, ctx, params, movable=None) -> None:
    """Slice of a split tensor with ``params`` = (starts, ends, axes, steps) or None;
    ``movable(k, dim)``: the bounds of entry ``k`` are stored constants the rewrite may move
    (then head dims may go from the level it cuts: rotate_half's halves)."""
    smap, rank = ctx.split_map(node.inputs[0]), _rank(ctx, node.inputs[0])
    if params is None or rank is None:
        ctx.block(smap, f"bounds of Slice {node.name} are not constant")
        return
    starts, ends, axes, steps = params
    axes = [normalize_axis(a, rank) for a in axes]
    cut = [k for k, a in enumerate(axes) if a in smap.axes]
    if not cut:
        ctx.set_map(node.outputs[0], smap)
        return
    k = cut[0]
    if len(cut) > 1 or steps[k] != 1 or starts[k] is None or ends[k] is None:
        ctx.block(smap, f"Slice {node.name} cuts a split channel axis in steps, twice or "
                        "at computed bounds")
        return
    dim = smap.labels.shape[smap.axes.index(axes[k])]
    start = _clamp(starts[k], dim)
    cut_level(node, ctx, smap, axes[k], [(start, max(start, _clamp(ends[k], dim)))],
              dims_may_go=movable is not None and movable(k, dim))


def _clamp(index: int, dim: int) -> int:
    index = index + dim if index < 0 else index
    return max(0, min(index, dim))


def shape(node, ctx) -> None:
    """Sizes of levels read by a Shape (head_dim for the scale): those levels stay whole,
    unless the sizes only build Reshape/Expand shapes (``symbolic_sizes.reads_follow``)."""
    smap, rank = ctx.split_map(node.inputs[0]), _rank(ctx, node.inputs[0])
    if rank is None:
        ctx.block(smap, f"rank of the input of Shape {node.name} is unknown")
        return
    why = reads_follow(node, ctx)
    if why is None:
        return
    read = shape_read_axes(node, ctx, rank)
    if not read & set(smap.axes):
        return
    scale = computed_scale(node, read, ctx.opset, ctx.const)
    if isinstance(scale, list):  # a constant of the original: the rewrite feeds it
        ctx.computed_scales[node.name] = (tuple(sorted(read)), scale)
        return
    for k, axis in enumerate(smap.axes):
        if axis in read:
            require_whole(ctx, smap, k, scale or f"its size is read by Shape {node.name} ({why})")


def gather(node, ctx) -> None:
    smap = ctx.split_map(node.inputs[0])
    rank, idx_rank = _rank(ctx, node.inputs[0]), _rank(ctx, node.inputs[1])
    if rank is None or idx_rank is None:
        ctx.block(smap, f"ranks around Gather {node.name} are unknown")
        return
    axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
    position = smap.position(axis)
    if position is None:
        def shift(a):
            return a if a < axis else a - 1 + idx_rank
        ctx.set_map(node.outputs[0], smap.moved(shift(a) for a in smap.axes))
        return
    index = ctx.const(node.inputs[1])
    if index is None or np.asarray(index).ndim != 0:
        ctx.block(smap, f"Gather {node.name} indexes a split channel axis at run time")
        return
    n = smap.labels.shape[position]
    require_whole(ctx, smap, position, f"Gather {node.name} picks a fixed entry")
    out = drop_level(smap, position, int(index) % n, lambda a: a if a < axis else a - 1)
    ctx.set_map(node.outputs[0], out)


def shape_read_axes(node, ctx, rank: int) -> set[int]:
    """Axes whose sizes a Shape's readers pick (constant Gather/Slice), else every axis."""
    start = normalize_axis(int(node.attrs.get("start", 0)), rank)
    end = node.attrs.get("end")
    end = rank if end is None else normalize_axis(int(end), rank)
    every = set(range(start, end))
    picked: set[int] = set()
    for reader in node.outputs[0].outputs:
        values = [ctx.const(t) for t in reader.inputs[1:]]
        if reader.op == "Gather" and values and values[0] is not None:
            picked |= {start + (int(i) % (end - start)) for i in np.asarray(values[0]).reshape(-1)}
        elif reader.op == "Slice" and len(values) >= 2 and all(v is not None for v in values[:2]) \
                and all(v is None or np.all(np.asarray(v) == w) for v, w in
                        zip(values[2:4], (0, 1))):
            n = end - start
            lo_raw, hi_raw = (int(np.asarray(v).reshape(-1)[0]) for v in values[:2])
            lo = max(0, min(n, lo_raw + n if lo_raw < 0 else lo_raw))  # -1: the last axis
            hi = max(0, min(n, hi_raw + n if hi_raw < 0 else hi_raw))
            picked |= {start + i for i in range(lo, hi)}
        else:
            return every
    return picked


def cut_level(node, ctx, smap: SplitMap, axis: int, bounds: list[tuple[int, int]],
              dims_may_go: bool = False) -> None:
    """Split/Slice on a level axis: each output keeps ``[start, stop)`` of it, the level whole
    (not the heads); with ``dims_may_go`` its entries may still go as head dims (the rewrite
    moves the bounds to the kept counts below them)."""
    position = smap.position(axis)
    why = f"{node.op} {node.name} cuts it at fixed bounds"
    if dims_may_go:
        ctx.split_records[smap.record].whole.setdefault(smap.levels[position], why)
    else:
        require_whole(ctx, smap, position, why)
    for out, (start, stop) in zip(node.outputs, bounds):
        if stop <= start:
            ctx.empty_cuts.add(out.name)
        index = [slice(None)] * smap.labels.ndim
        index[position] = slice(start, stop)
        ctx.set_map(out, replace(smap, labels=smap.labels[tuple(index)]))


# ---- Reshape ----------------------------------------------------------------------------------


# ---- Reshape ----------------------------------------------------------------------------------


def _resolved(node, ctx):
    """(input sizes, output sizes, target elements) of a Reshape, symbols as stand-in primes."""
    in_dims = symbolic_dims(node.inputs[0])
    elements = shape_elements(node, 1, ctx)
    if in_dims is None or elements is None:
        return None
    resolved = resolve_reshape_target(in_dims, elements, bool(node.attrs.get("allowzero", 0)))
    if resolved is None:
        return None
    return resolved[0], resolved[1], elements


def _rewritable(node, ctx, elements, axes) -> bool:
    """Every target element at ``axes`` is -1, a stored constant we can rewrite, or a size read
    by Shape off a split level (it follows that level at run time: ``symbolic_sizes``)."""
    return all(elements[j].value == -1 or reads_level(elements[j], ctx) is not None or (
        elements[j].value is not None and rewritable_source(node, 1, j, elements, ctx) is not None)
        for j in axes)


def _computed_from(elements, axes, labels: np.ndarray) -> bool:
    """An element at ``axes`` is computed from the count of these very channels (``C // h``):
    it would follow the plan where the split must not."""
    return any(elements[j].channels is not None and
               np.isin(elements[j].channels, labels[labels >= 0]).any() for j in axes)


def _keep_computed_whole(node, ctx, smap: SplitMap, elements, axes) -> None:
    """A level whose target element is computed (from shapes, not from our channels) keeps
    all its entries: the element then holds its value."""
    for k, j in enumerate(axes):
        if not _rewritable(node, ctx, elements, [j]):
            require_whole(ctx, smap, k, f"Reshape {node.name} computes its size")


def _span(in_shape, lo: int, hi: int, out_shape: list[int]) -> tuple[int, int] | None:
    """Output axes ``[j0, j1)`` holding exactly the elements of input axes ``lo..hi``."""
    mid = in_shape[lo:hi + 1]
    if any(d is None for d in mid):
        return None
    mid_n, total = prod(mid), prod(out_shape)
    pre, post = in_shape[:lo], in_shape[hi + 1:]
    if all(d is not None for d in pre):
        before = prod(pre)
        after = total // max(before * mid_n, 1)
    elif all(d is not None for d in post):
        after = prod(post)
        before = total // max(after * mid_n, 1)
    else:
        return None
    if before * mid_n * after != total:
        return None
    for j0 in range(len(out_shape) + 1):
        if prod(out_shape[:j0]) != before:
            continue
        for j1 in range(j0, len(out_shape) + 1):
            if prod(out_shape[j0:j1]) == mid_n and prod(out_shape[j1:]) == after:
                return j0, j1
    return None


def reshape_splits(node, ctx, xmap: ChannelMap) -> bool:
    """Split ``xmap``'s channel axis when the Reshape cuts it; True when handled (or blocked)."""
    resolved = _resolved(node, ctx)
    if resolved is None:
        return False
    in_shape, out_shape, elements = resolved
    span = _span(in_shape, xmap.axis, xmap.axis, out_shape)
    if span is None:
        return False
    levels = [j for j in range(*span) if out_shape[j] != 1]
    if levels == [len(out_shape) - 1] and span[0] == len(out_shape) - 2 >= 2:
        levels = [span[0], levels[0]]  # one head: multi-query attention's K/V, (b, s, 1, d)
    if len(levels) < 2:
        return False
    if _computed_from(elements, levels, xmap.labels):
        ctx.block(xmap, f"Reshape {node.name} splits the channel axis with a computed shape")
        return True
    sizes = [out_shape[j] for j in levels]
    smap = new_split(ctx, f"Reshape {node.name}", xmap.labels.reshape(sizes), levels)
    _keep_computed_whole(node, ctx, smap, elements, levels)
    ctx.set_map(node.outputs[0], smap)
    _refine(node, out_shape, ctx)
    return True


def _refine(node, out_shape: list[int], ctx) -> None:
    """Give later handlers the output shape (or the dims of it) onnx's inference could not
    find (a computed target); symbols come back as their names."""
    current = node.outputs[0].shape
    if current is not None and None not in current:
        return
    in_dims = symbolic_dims(node.inputs[0])
    names = named_dims(out_shape, in_dims, shape_elements(node, 1, ctx) or [])
    names = [None if isinstance(d, str) and d.startswith("?") else d for d in names]
    if current is not None and len(current) == len(names):
        names = [d if d is not None else n for d, n in zip(current, names)]
    if names != current:
        node.outputs[0].shape = names
        ctx.refined.add(node.outputs[0].name)


def reshape_split_input(node, ctx, smap: SplitMap) -> None:
    """Reshape of a split tensor: merge its levels back, or move them (see module docstring)."""
    if len(smap.axes) == 1:  # one level left (q of a packed qkv): it may be split again
        plain = ChannelMap(smap.axes[0], smap.labels)
        if reshape_splits(node, ctx, plain):
            require_free(ctx, smap, 0, f"Reshape {node.name} splits it into heads")
            return
    where = f"Reshape {node.name}"
    resolved = _resolved(node, ctx)
    if resolved is None:
        ctx.block(smap, f"{where} reshapes a split channel axis with unknown shapes")
        return
    in_shape, out_shape, elements = resolved
    lo, hi = min(smap.axes), max(smap.axes)
    inside = [a for a in range(lo, hi + 1) if a not in smap.axes]
    span = _span(in_shape, lo, hi, out_shape)
    if span is not None and all(in_shape[a] == 1 for a in inside):
        big = [j for j in range(*span) if out_shape[j] != 1]
        if len(big) == 1:  # the levels merge into one channel axis, read in tensor order
            if _computed_from(elements, big, smap.flat()):
                ctx.block(smap, f"{where} merges heads with a computed shape")
                return
            if not _rewritable(node, ctx, elements, big):
                for k in range(len(smap.axes)):
                    require_whole(ctx, smap, k, f"{where} computes the merged size")
            order = np.argsort(smap.axes)
            labels = np.transpose(smap.labels, order).reshape(-1)
            heads = ctx.split_records[smap.record].heads
            ctx.set_map(node.outputs[0], ChannelMap(big[0], labels, heads=heads))
            _refine(node, out_shape, ctx)
            return
    moved, labels, repeated = [], smap.labels, None
    for position, axis in enumerate(smap.axes):  # every level alone in its block: it moves
        found = _level_block(smap, axis, in_shape, out_shape)
        if found is None:
            ctx.block(smap, f"{where} regroups a split channel axis")
            return
        out_axis, outer, inner = found
        moved.append(out_axis)
        if inner > 1 and outer == 1 and repeated is None:
            repeated = (position, axis, inner)
        labels = np.repeat(labels, inner, axis=position)
        labels = np.concatenate([labels] * outer, axis=position) if outer > 1 else labels
    if _computed_from(elements, moved, smap.flat()):
        ctx.block(smap, f"{where} moves heads with a computed shape")
        return
    copies = None if repeated is None else repeat_copies(node, ctx, smap, *repeated, moved)
    out = replace(smap.moved(moved), labels=labels) if copies is None else copies
    _keep_computed_whole(node, ctx, out, elements, moved)
    ctx.set_map(node.outputs[0], out)
    _refine(node, out_shape, ctx)


def _level_block(smap: SplitMap, axis: int, in_shape, out_shape) -> tuple[int, int, int] | None:
    """(output axis, outer, inner) when level ``axis`` lands on one output axis, alone or merged
    with neighbouring axes that hold no level (repeat_kv's expanded ``n_rep`` axis: each entry
    of the level is then repeated ``inner`` times and the whole level tiled ``outer`` times)."""
    others = [a for a in smap.axes if a != axis]
    for width in range(len(in_shape)):
        for lo in range(max(0, axis - width), axis + 1):
            hi = lo + width
            if hi >= len(in_shape) or any(lo <= a <= hi for a in others):
                continue
            found = _span(in_shape, lo, hi, out_shape)
            big = [] if found is None else [j for j in range(*found) if out_shape[j] != 1]
            if len(big) != 1:
                continue
            outer, inner = prod(in_shape[lo:axis]), prod(in_shape[axis + 1:hi + 1])
            if outer * inner >= 2**31:  # a symbolic dim (a stand-in prime) merged in
                continue
            return big[0], outer, inner
    return None


def reshape_apply(node, ctx) -> bool:
    """Rewrite the target of a Reshape that creates, moves or merges a split; True if handled."""
    in_split, out_split = ctx.split_map(node.inputs[0]), ctx.split_map(node.outputs[0])
    if in_split is None and out_split is None:
        return False
    if out_split is not None:
        found = ctx.split_keeps(node.outputs[0])
        free = ctx.split_keep(node.outputs[0])
    else:
        out_map = ctx.map(node.outputs[0])
        keep = ctx.keep(node.outputs[0])
        found = [] if out_map is None or keep is None else [(out_map.axis, keep)]
        free = found[0] if found else None
    if not found:
        return True
    _check_read_sizes(node, ctx, found)
    for axis, keep in found:  # the heads kept, and the head dims kept within them
        elements = shape_elements(node, 1, ctx)  # an earlier element may have copied the path
        if elements[axis].value != -1 and runtime_count(elements[axis], ctx) != len(keep):
            ctx.set_shape_element(rewritable_source(node, 1, axis, elements, ctx), len(keep))
    repeat = ctx.analysis.slot_repeats.get(node.name)
    if repeat is not None and free is not None:
        _rewrite_slots(node, ctx, repeat, len(free[1]))
    return True


def _check_read_sizes(node, ctx, found) -> None:
    """A target element read by Shape off an axis that shrinks must land on an axis that
    keeps that many (``symbolic_sizes.runtime_count``): it cannot be rewritten."""
    kept = dict(found)
    for j, element in enumerate(shape_elements(node, 1, ctx) or ()):
        count = runtime_count(element, ctx)
        if count is None or count == element.value:
            continue  # not read by Shape, or read off an axis that keeps its size
        if j not in kept or len(kept[j]) != count:
            raise RewriteError(f"Reshape {node.name}: element {j} of its shape, read by Shape, "
                               f"is {count} at run time where the plan keeps "
                               f"{len(kept[j]) if j in kept else 'all'}")


def _rewrite_slots(node, ctx, repeat, kept_copies: int) -> None:
    """repeat_kv with whole KV heads: its Expand's ``n_rep`` becomes the query slots kept."""
    expand = node.inputs[0].inputs[0]
    found = ctx.split_keep(node.inputs[0])
    kv = repeat.copies.shape[repeat.position] if found is None else len(found[1])
    if kept_copies % kv:
        raise RewriteError(f"{node.name}: {kept_copies} heads kept over {kv} KV heads")
    if kept_copies // kv == repeat.n_rep:
        return
    elements = shape_elements(expand, 1, ctx)
    ctx.set_shape_element(rewritable_source(expand, 1, repeat.element, elements, ctx),
                          kept_copies // kv)

"""Heads repeated for their readers: HF ``repeat_kv`` (grouped-query attention, issue 21).

``repeat_kv`` expands a KV head to the ``n_rep`` query heads that read it
(``Expand(Unsqueeze(k), (b, kv, n_rep, s, d))`` then ``Reshape`` to ``(b, kv * n_rep, s, d)``).
Each repeated copy gets atoms of its own (no filters: they join their readers' classes), in a
split record of its own, and is coupled at the end of the analysis in one of two ways:

* the KV heads may lose entries: copy ``(g, s)`` is KV head ``g`` (a KV group, its K and V heads
  and its query heads, is one class);
* the KV heads stay whole (a KV cache: a graph input and output read them): copy ``(g, s)`` is
  coupled with copy ``(0, s)`` of every other group, so the same query slots go from every group
  and ``n_rep`` shrinks uniformly; the Expand's ``n_rep`` (a stored shape element) is rewritten
  to the slots kept. When that element is computed, the first way is taken (then the heads stay).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import SplitMap, SplitRecord, new_split, require_free
from .shape_values import rewritable_source, shape_elements


@dataclass(frozen=True)
class RepeatCopies:
    """One ``repeat_kv``: the copies of a split level and the level they copy.

    Attributes:
        reshape: the Reshape that merges the KV axis with the expanded ``n_rep`` axis.
        expand: the Expand that makes the ``n_rep`` axis, and ``element``, the index of
            ``n_rep`` in its shape (None: it cannot be rewritten).
        copies: the copies' labels, the level grid with the repeated level as ``(kv, n_rep)``.
        source: the copied split's labels (its level grid); ``record``/``level``: its record and
            the repeated level's record level; ``position``: that level's place in the grid.
    """

    reshape: str
    expand: str
    element: int | None
    copies: np.ndarray
    source: np.ndarray
    record: int
    level: int
    position: int

    @property
    def n_rep(self) -> int:
        return int(self.copies.shape[self.position + 1])


def resolve_repeats(repeats: list[RepeatCopies], records: list[SplitRecord],
                    blocked: np.ndarray, couple, block) -> dict[str, RepeatCopies]:
    """Couple every repeat's copies (see the module docstring); returns, by Reshape name, the
    repeats whose KV heads stay whole and whose query slots prune (their Expand is rewritten).

    The KV heads of such a repeat are blocked, every one: a KV head removed under query slots
    that stay would leave the Expand's ``n_rep`` pairing query heads with the wrong KV head."""
    slot_mode: dict[str, RepeatCopies] = {}
    for rep in repeats:
        p = rep.position
        tied = records[rep.record].free_level != rep.level or \
            bool(np.isin(rep.source[rep.source >= 0], blocked).any())
        if tied and rep.element is not None:
            slot_mode[rep.reshape] = rep
            block(rep.source, f"split at {rep.reshape}: its KV heads stay whole, the query "
                              "slots within each group prune")
            first = np.take(rep.copies, 0, axis=p)
            for g in range(1, rep.copies.shape[p]):
                couple(first.reshape(-1), np.take(rep.copies, g, axis=p).reshape(-1),
                       f"the query slots of {rep.expand}")
            continue
        for s in range(rep.n_rep):
            couple(np.take(rep.copies, s, axis=p + 1).reshape(-1), rep.source.reshape(-1),
                   f"repeat {rep.expand}")
    return slot_mode


def repeat_copies(node, ctx, smap: SplitMap, position: int, axis: int, n_rep: int,
                  out_axes: list[int]) -> SplitMap | None:
    """The split after ``node`` (a Reshape) merges level ``position`` (on tensor ``axis``) with
    the ``n_rep`` axis after it that an Expand made: copies of its own, recorded for
    ``resolve_repeats``. None when the input is not such an Expand (the labels then repeat)."""
    data = node.inputs[0]
    expand = data.inputs[0] if data.inputs else None
    dims = ctx.shape(data)
    if expand is None or expand.op != "Expand" or dims is None or axis + 1 >= len(dims) or \
            dims[axis + 1] != n_rep:
        return None
    source_dims = ctx.shape(expand.inputs[0])
    elements = shape_elements(expand, 1, ctx)
    if source_dims is None or elements is None:
        return None
    local = axis + 1 - (len(dims) - len(source_dims))
    if local >= 0 and source_dims[local] != 1:
        return None  # the axis is not broadcast: not copies
    index = axis + 1 - (len(dims) - len(elements))
    element = index if index >= 0 and elements[index].value == n_rep and \
        rewritable_source(expand, 1, index, elements, ctx) is not None else None
    shape = list(smap.labels.shape)
    grid = [*shape[:position], shape[position], n_rep, *shape[position + 1:]]
    copies = ctx.new_virtual(int(np.prod(grid))).reshape(grid)
    merged = copies.reshape([*shape[:position], shape[position] * n_rep, *shape[position + 1:]])
    out = new_split(ctx, f"Reshape {node.name}", merged, out_axes)
    source = ctx.split_records[smap.record]
    record = ctx.split_records[out.record]
    record.whole = {lv: why for lv, why in ((smap.levels.index(k), w) for k, w in
                                             source.whole.items() if k in smap.levels)
                    if lv != position}
    record.dims_whole = {lv: why for lv, why in ((smap.levels.index(k), w) for k, w in
                                                  source.dims_whole.items() if k in smap.levels)
                         if lv != position}
    for k in range(len(shape)):  # a copy keeps the head dims of the KV head it copies
        if k != position:
            index = [0] * len(grid)
            index[k + (k > position)] = slice(None)
            ctx.contracted.append((smap.representative(k), copies[tuple(index)]))
    why = f"Reshape {node.name} repeats its heads"
    record.free[position] = why
    require_free(ctx, smap, position, why, heads=True)  # KV heads: heads of their readers
    ctx.repeats.append(RepeatCopies(node.name, expand.name, element, copies, smap.labels,
                                    smap.record, smap.levels[position], position))
    return out

"""Split channel axes: channels that move as blocks (attention heads, channel shuffle).

A Reshape may cut a channel axis of ``C`` positions into *levels* ``(n_1, ..., n_k)`` spread over
several tensor axes, e.g. a fused ``qkv`` projection's ``3C`` features into ``(3, heads, head_dim)``
or a shuffle's ``C`` channels into ``(groups, C / groups)``. Such a tensor is a
:class:`SplitMap`: one atom label per element of the level grid (``labels[i_1, ..., i_k]`` is the
channel ``((i_1 * n_2) + i_2) * ... + i_k`` of the tensor that was split).

Removing channels from a split tensor is exact only when the kept positions still form a grid
(the product of the entries kept on each level). One level, the *free* level, loses whole
entries as classes: whole heads (all ``head_dim`` channels of a head, in Q, K and V, go
together), or for a channel shuffle the inner level (the same offset goes from every block, so
the shuffled branches stay balanced). A head record may also lose entries of its ``head_dim``
level, the same ones from every head (``head_dims.py``). Every tensor derived from one split
shares a :class:`SplitRecord`; consumers state what they need of its levels:

* ``require_whole``: a level is indexed by a constant (``qkv[0]``), read as a size, or otherwise
  needed whole: it holds no heads and loses no head dims;
* ``require_contracted``: a level is contracted (``q @ k^T`` over ``head_dim``): no heads, but
  entry ``j`` of both operands may go together as a head dim;
* ``require_free``: a level is a batch axis of an attention MatMul: it holds the heads.

When the analysis finishes (:func:`resolve_splits`), each record picks its free level (the one
asked for, else the innermost level that may lose entries) and couples, for every index ``i`` of
that level, all labels with that index into one class: a head (its slab is handed back and
coupled after ``head_dims`` has read the couplings without it), or one offset of a shuffle. A
record that cannot pick a level blocks its channels. :func:`split_keeps` reads every level
that lost entries, for the rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SplitMap:
    """Channels spread over several tensor axes.

    Attributes:
        axes: the tensor axis of each level still present, in level order.
        labels: atom labels, one axis per entry of ``axes`` (-1: not ours).
        record: index of the :class:`SplitRecord` shared by every tensor of this split.
        levels: the record level of each entry of ``axes``.
    """

    axes: tuple[int, ...]
    labels: np.ndarray
    record: int
    levels: tuple[int, ...]

    def moved(self, axes) -> SplitMap:
        return replace(self, axes=tuple(int(a) for a in axes))

    def passed(self) -> SplitMap:
        """The same split after an op that changes values (``ChannelMap.passed``: a split
        has no fold target to lose)."""
        return self

    def position(self, axis: int) -> int | None:
        """Which entry of ``axes`` is tensor axis ``axis`` (None: not a level)."""
        return self.axes.index(axis) if axis in self.axes else None

    def representative(self, position: int) -> np.ndarray:
        """One label per entry of level ``position`` (the others at index 0)."""
        index = [0] * self.labels.ndim
        index[position] = slice(None)
        return self.labels[tuple(index)]

    def flat(self) -> np.ndarray:
        return self.labels.reshape(-1)


@dataclass
class SplitRecord:
    """What the consumers of one split need; resolved when the analysis finishes."""

    where: str
    labels: np.ndarray
    whole: dict[int, str] = field(default_factory=dict)
    free: dict[int, str] = field(default_factory=dict)
    heads: bool = False
    free_level: int | None = None
    #: Levels whose entries may not go within the kept heads (``head_dims``): every ``whole``
    #: reason but a contraction with another split (``q @ k^T``), which pairs entries instead.
    dims_whole: dict[int, str] = field(default_factory=dict)


class SplitContext(Protocol):
    """What the split bookkeeping uses of the analysis' state (``context.AnalysisContext``),
    declared here so this module needs nothing above it."""

    split_records: list[SplitRecord]
    #: (atoms of one operand, atoms of the other) at each index of a contracted level pair.
    contracted: list[tuple[np.ndarray, np.ndarray]]

    def split_map(self, tensor) -> SplitMap | None: ...

    def couple(self, a: np.ndarray, b: np.ndarray, where: str) -> None: ...

    def block(self, cmap, reason: str) -> None: ...

    def block_tensor(self, tensor, reason: str) -> None: ...


def new_split(ctx: SplitContext, where: str, labels: np.ndarray,
              axes: list[int]) -> SplitMap:
    """A split of ``labels`` (already shaped as the level grid) onto tensor ``axes``."""
    ctx.split_records.append(SplitRecord(where, labels))
    return SplitMap(tuple(axes), labels, len(ctx.split_records) - 1, tuple(range(labels.ndim)))


def require_whole(ctx: SplitContext, smap: SplitMap, position: int, why: str) -> None:
    record = ctx.split_records[smap.record]
    record.whole.setdefault(smap.levels[position], why)
    record.dims_whole.setdefault(smap.levels[position], why)


def require_contracted(ctx: SplitContext, a: SplitMap, position_a: int, b: SplitMap,
                       position_b: int, why: str) -> None:
    """Level ``position_a`` of ``a`` is contracted with level ``position_b`` of ``b``
    (``q @ k^T`` over ``head_dim``): neither holds the heads, but entry ``j`` of one may go
    with entry ``j`` of the other (``head_dims`` pairs them)."""
    for smap, position in ((a, position_a), (b, position_b)):
        ctx.split_records[smap.record].whole.setdefault(smap.levels[position], why)
    ka, kb = a.representative(position_a), b.representative(position_b)
    ctx.contracted.append((ka, kb))


def require_free(ctx: SplitContext, smap: SplitMap, position: int, why: str,
                 heads: bool = False) -> None:
    record = ctx.split_records[smap.record]
    record.free.setdefault(smap.levels[position], why)
    record.heads = record.heads or heads


def drop_level(smap: SplitMap, position: int, index: int, axis_shift) -> SplitMap | None:
    """The split after a constant index picks entry ``index`` of level ``position``."""
    labels = np.take(smap.labels, index, axis=position)
    axes = [axis_shift(a) for k, a in enumerate(smap.axes) if k != position]
    levels = [lv for k, lv in enumerate(smap.levels) if k != position]
    return SplitMap(tuple(axes), labels, smap.record, tuple(levels))


def block_split_readers(node, handler, ctx: SplitContext) -> None:
    """A handler that does not declare ``accepts_split`` must not see split channels: block."""
    if getattr(handler, "accepts_split", False):
        return
    for tensor in node.inputs:
        if ctx.split_map(tensor) is not None:
            ctx.block_tensor(tensor, f"{node.op} {node.name} reads a split channel axis")


def resolve_splits(ctx: SplitContext) -> tuple[list[np.ndarray], list[tuple[np.ndarray, str]]]:
    """Pick every record's free level and couple its slabs; returns the head atoms per head,
    and the slabs of head records (not coupled here: ``head_dims`` reads the couplings without
    them, then the caller couples each slab into one head)."""
    heads: list[np.ndarray] = []
    head_slabs: list[np.ndarray] = []
    for record in ctx.split_records:
        sizes = record.labels.shape
        candidates = [lv for lv in range(len(sizes)) if lv not in record.whole and sizes[lv] > 1]
        wanted = sorted(record.free)
        reason = None
        if len(wanted) > 1:
            why = ", ".join(record.free[w] for w in wanted)
            reason = f"split at {record.where} is pruned on two levels ({why})"
        elif wanted and wanted[0] in record.whole:
            reason = (f"split at {record.where}: {record.free[wanted[0]]}, but "
                      f"{record.whole[wanted[0]]}")
        elif wanted and wanted[0] not in candidates:
            reason = f"split at {record.where}: the head level has one entry"
        elif not candidates:
            reason = f"split at {record.where}: every level must stay whole (" + ", ".join(
                record.whole.values()) + ")"
        if reason is not None:
            ctx.block(record.labels.reshape(-1), reason)
            continue
        level = wanted[0] if wanted else candidates[-1]
        record.free_level = level
        for i in range(sizes[level]):
            slab = np.take(record.labels, i, axis=level).reshape(-1)
            if record.heads:
                heads.append(slab[slab >= 0])
                head_slabs.append((slab, f"split at {record.where}"))
            else:
                ctx.couple(np.full_like(slab, slab[0]), slab, f"split at {record.where}")
    return heads, head_slabs


def split_keeps(removed: np.ndarray, smap: SplitMap) -> list[tuple[int, np.ndarray]]:
    """(position, kept indices) of every level of ``smap`` that loses entries: whole heads on
    the free level, head dimensions (``head_dims``) on another. The kept positions must form
    a grid (their product); anything else is a bug of the plan, raised."""
    gone = removed[smap.labels]
    found, kept_grid = [], np.ones(smap.labels.shape, dtype=bool)
    for position in range(smap.labels.ndim):
        lines = np.moveaxis(gone, position, 0).reshape(smap.labels.shape[position], -1)
        kept = ~lines.all(axis=1)
        shape = [1] * smap.labels.ndim
        shape[position] = len(kept)
        kept_grid = kept_grid & kept.reshape(shape)
        if not kept.all():
            found.append((position, np.flatnonzero(kept).astype(np.int64)))
    if not np.array_equal(kept_grid, ~gone):
        raise ValueError(f"the channels kept of split {smap.record} do not form a grid")
    return found


def split_keep(removed: np.ndarray, smap: SplitMap, free_level: int | None):
    """(position, kept indices) of the free level in ``smap`` when it loses entries, else None."""
    if free_level is None or free_level not in smap.levels:
        return None
    position = smap.levels.index(free_level)
    gone = np.moveaxis(removed[smap.labels], position, 0).reshape(smap.labels.shape[position], -1)
    kept = ~gone.all(axis=1)
    if kept.all():
        return None
    return position, np.flatnonzero(kept).astype(np.int64)

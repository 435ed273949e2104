"""Scoring a group of coupled channels with FPGM.

Rule (joint space): channel c of a group is described by the concatenation of its filters from
every member that owns it: producers (Conv/ConvTranspose/Gemm/MatMul output filters) and
pass-through members (depthwise filters). Each member's block is first scaled to unit Frobenius
norm so that no layer dominates by magnitude; a member that does not own channel c contributes
zeros there. With a single member nothing is rescaled, so a one-producer group selects exactly
what the single-layer FPGM core selects. Filters are *effective* filters: a BatchNorm (or
per-channel scale) right after the producer is folded in virtually, so that BN-folded and
BN-unfolded exports of one network score alike. A channel that one member owns several times (an
attention head: its ``head_dim`` rows of Q, K and V; two coupled slices of one producer) gets
those rows side by side, in their order, so a head is one point in the joint space.
"""
from __future__ import annotations

import numpy as np

from ..deps.channels import Analysis, Group


def group_filters(analysis: Analysis, group: Group) -> np.ndarray:
    """The (n_channels, D) joint filter matrix of ``group`` (float64 for small groups)."""
    position = np.full(len(analysis.class_blocked) + 1, -1, dtype=np.int64)  # -1: no class
    position[group.classes] = np.arange(group.n_channels)
    blocks = []
    for member_id in group.members:
        member = analysis.members[member_id]
        rows_pos = position[analysis.class_of(group)[member.atoms]]
        inside = rows_pos >= 0
        rows = member.rows if inside.all() else member.rows[inside]
        scale = member.scale if inside.all() else member.scale[inside]
        if not np.all(scale == 1.0):
            rows = rows * scale[:, None].astype(rows.dtype if rows.dtype.kind == "f" else
                                                np.float64)
        pos = rows_pos[inside]
        slot = _occurrence(pos)
        if slot.max(initial=0) > 0:  # a class with several rows here (a head's head_dim rows)
            wide = np.zeros((len(np.unique(pos)), (slot.max() + 1) * rows.shape[1]), rows.dtype)
            owner, first = np.unique(pos, return_inverse=True)
            for k in range(slot.max() + 1):
                picked = slot == k
                wide[first[picked], k * rows.shape[1]:(k + 1) * rows.shape[1]] = rows[picked]
            pos, rows = owner, wide
        blocks.append((pos, rows))
    multi = len(blocks) > 1
    if not multi and np.array_equal(blocks[0][0], np.arange(group.n_channels)):
        rows = blocks[0][1]  # one producer, channels in order: its filters as they are
        return rows if rows.dtype.kind == "f" else rows.astype(np.float64)
    width = sum(rows.shape[1] for _, rows in blocks)
    dtype = np.float64 if any(rows.dtype == np.float64 for _, rows in blocks) else np.float32
    joint = np.zeros((group.n_channels, width), dtype=dtype)
    offset = 0
    for pos, rows in blocks:
        rows = rows.astype(dtype, copy=False)
        if multi:
            norm = float(np.linalg.norm(rows.astype(np.float64, copy=False)))
            rows = rows / rows.dtype.type(norm) if norm > 0 else rows
        columns = slice(offset, offset + rows.shape[1])
        joint[pos, columns] += rows
        offset += rows.shape[1]
    return joint


def group_width(analysis: Analysis, group: Group) -> int:
    """D of ``group_filters(analysis, group)``, from the members' shapes alone (nothing built):
    a member's rows, times the most rows it gives one channel (a head's ``head_dim``)."""
    position = np.full(len(analysis.class_blocked) + 1, -1, dtype=np.int64)  # -1: no class
    position[group.classes] = np.arange(group.n_channels)
    width = 0
    for member_id in group.members:
        member = analysis.members[member_id]
        pos = position[analysis.class_of(group)[member.atoms]]
        pos = pos[pos >= 0]
        width += (int(np.bincount(pos).max()) if pos.size else 1) * member.rows.shape[1]
    return width


def _occurrence(pos: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries hold the same value (0 for the first)."""
    order = np.argsort(pos, kind="stable")
    ranks = np.empty(len(pos), dtype=np.int64)
    sorted_pos = pos[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_pos)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
    ranks[order] = np.arange(len(pos)) - run_start
    return ranks

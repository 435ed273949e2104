"""Scoring a group of coupled channels with FPGM.

Rule (joint space): channel c of a group is described by the concatenation of its filters from
every member that owns it: producers (Conv/ConvTranspose/Gemm/MatMul output filters) and
pass-through members (depthwise filters). Each member's block is first scaled to unit Frobenius
norm so that no layer dominates by magnitude; a member that does not own channel c contributes
zeros there. With a single member nothing is rescaled, so a one-producer group selects exactly
what the single-layer FPGM core selects. Filters are *effective* filters: a BatchNorm (or
per-channel scale) right after the producer is folded in virtually, so that BN-folded and
BN-unfolded exports of one network score alike.
"""
from __future__ import annotations

import numpy as np

from ..deps.analysis import Analysis, Group


def group_filters(analysis: Analysis, group: Group) -> np.ndarray:
    """The (n_channels, D) joint filter matrix of ``group`` (float64 for small groups)."""
    position = np.full(len(analysis.class_blocked), -1, dtype=np.int64)
    position[group.classes] = np.arange(group.n_channels)
    blocks = []
    for member_id in group.members:
        member = analysis.members[member_id]
        rows_pos = position[analysis.class_of_atom[member.atoms]]
        inside = rows_pos >= 0
        rows = member.rows if inside.all() else member.rows[inside]
        scale = member.scale if inside.all() else member.scale[inside]
        if not np.all(scale == 1.0):
            rows = rows * scale[:, None].astype(rows.dtype if rows.dtype.kind == "f" else
                                                np.float64)
        blocks.append((rows_pos[inside], rows))
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
        if len(np.unique(pos)) == len(pos):
            joint[pos, columns] += rows
        else:  # a channel owned twice by one member (e.g. two slices of it added together)
            np.add.at(joint, (pos, columns), rows)
        offset += rows.shape[1]
    return joint

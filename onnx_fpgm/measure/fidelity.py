"""Parts of a model output, compared one by one: a single cosine over a whole output hides
the collapse of a small part (class scores beside box coordinates in a detection head, where
the coordinates' magnitude dominates every norm).

Rules (``output_parts``):

* a 2-D ``(N, C)`` output is one part; with ``C > 1`` it holds class scores: top-1 agreement
  (argmax over C) is reported, and accuracy when labels are given;
* an output of rank >= 3 has its channel axis at 1 (``(N, C, ...)``), or last when the last axis
  is the smaller one (``(N, anchors, C)``). Its channels are split into contiguous blocks by
  layout: channels whose values all lie in [0, 1] on the reference (scores, probabilities)
  and channels that do not (coordinates, logits). A YOLO-style ``(N, 4 + classes, anchors)``
  head so becomes ``[0:4]`` (boxes) and ``[4:84]`` (class scores). A score block of more than
  one channel gets a top-k agreement: the share of the reference's ``k`` highest-scoring
  positions (by their best class) that are also among the pruned model's ``k`` highest.

Decisions that must not be fooled by one healthy part use the worst part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Positions compared by the top-k agreement of a score block.
TOP_K = 100


@dataclass
class Part:
    """One part of an output, compared between the original (want) and the pruned (have)."""

    name: str
    cosine: float
    relative_error: float
    top1: float | None  # argmax (2-D) or top-k (score block) agreement
    agreement: str = "top-1"
    scores_want: np.ndarray | None = None
    scores_have: np.ndarray | None = None


def output_parts(want: np.ndarray, have: np.ndarray, name: str = "") -> list[Part]:
    """Compare ``want`` and ``have`` part by part (see the module docstring)."""
    axis, blocks = part_layout(want, name)
    if axis is None:
        scores = want.ndim == 2 and want.shape[1] > 1
        return [_compare(name, want, have, scores)]
    w = np.moveaxis(want, axis, 1)
    h = np.moveaxis(have, axis, 1)
    return [_block(part, w[:, a:b], h[:, a:b], unit) for part, a, b, unit in blocks]


def part_layout(want: np.ndarray, name: str = "") -> tuple[int | None, list[tuple]]:
    """How ``output_parts`` splits an output: ``(None, [])`` for one whole part, else the
    channel axis and ``(part name, start, stop, all values in [0, 1])`` per block."""
    if want.ndim <= 2 or want.shape[0] == 0:
        return None, []
    axis = want.ndim - 1 if want.shape[-1] < want.shape[1] else 1
    flat = np.moveaxis(want, axis, 1).reshape(want.shape[0], want.shape[axis], -1)
    unit = ((flat >= 0) & (flat <= 1)).all(axis=(0, 2))
    bounds = [0, *(np.flatnonzero(unit[1:] != unit[:-1]) + 1).tolist(), len(unit)]
    if len(bounds) == 2:
        return axis, [(name, 0, len(unit), bool(unit[0]))]
    return axis, [(f"{name}[{a}:{b}]", a, b, bool(unit[a]))
                  for a, b in zip(bounds[:-1], bounds[1:])]


def _block(name: str, want: np.ndarray, have: np.ndarray, scores: bool) -> Part:
    part = _compare(name, want, have, scores=False)
    if scores and want.shape[1] > 1:
        best_want = want.reshape(want.shape[0], want.shape[1], -1).max(1)
        best_have = have.reshape(have.shape[0], have.shape[1], -1).max(1)
        k = min(TOP_K, best_want.shape[1])
        top_want = np.argpartition(-best_want, k - 1, axis=1)[:, :k]
        top_have = np.argpartition(-best_have, k - 1, axis=1)[:, :k]
        part.top1 = float(np.mean([len(np.intersect1d(a, b)) / k
                                   for a, b in zip(top_want, top_have)]))
        part.agreement = f"top-{k}"
    return part


def _compare(name: str, want: np.ndarray, have: np.ndarray, scores: bool) -> Part:
    a = want.astype(np.float64).reshape(len(want), -1)
    b = have.astype(np.float64).reshape(len(have), -1)
    norm_a = np.linalg.norm(a)
    cosine = float(np.sum(a * b) / max(norm_a * np.linalg.norm(b), 1e-30))
    rel = float(np.linalg.norm(a - b) / max(norm_a, 1e-30))
    if scores:
        top1 = float(np.mean(want.argmax(-1) == have.argmax(-1)))
        return Part(name, cosine, rel, top1, "top-1", want, have)
    return Part(name, cosine, rel, None)

"""Parts of a model output, compared one by one: a single cosine over a whole output hides
the collapse of a small part (class scores beside box coordinates in a detection head).

An output is split into parts along its channel axis (axis 1 of a rank >= 3 output): a 2-D
``(N, C)`` output is one part of class scores; other outputs are one part each.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Part:
    """One part of an output, compared between the original (want) and the pruned (have)."""

    name: str
    cosine: float
    relative_error: float
    top1: float | None  # argmax agreement when the part holds scores
    scores_want: np.ndarray | None = None
    scores_have: np.ndarray | None = None


def output_parts(want: np.ndarray, have: np.ndarray, name: str = "") -> list[Part]:
    """Compare ``want`` and ``have`` part by part (see the module docstring)."""
    return [_compare(name, want, have, scores=want.ndim == 2 and want.shape[1] > 1)]


def _compare(name: str, want: np.ndarray, have: np.ndarray, scores: bool) -> Part:
    a = want.astype(np.float64).reshape(len(want), -1)
    b = have.astype(np.float64).reshape(len(have), -1)
    norm_a = np.linalg.norm(a)
    cosine = float(np.sum(a * b) / max(norm_a * np.linalg.norm(b), 1e-30))
    rel = float(np.linalg.norm(a - b) / max(norm_a, 1e-30))
    top1 = None
    if scores:
        top1 = float(np.mean(want.argmax(-1) == have.argmax(-1)))
        return Part(name, cosine, rel, top1, want, have)
    return Part(name, cosine, rel, top1)

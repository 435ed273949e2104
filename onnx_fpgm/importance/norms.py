"""Filter-norm importance (L1/L2): the classic baselines FPGM is compared against.

Unlike FPGM, a larger norm means *more* important, so the smallest norms are pruned. Computed
in float64: the cost is one pass over the weights, and exact-enough values keep rankings
reproducible across devices and input dtypes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ScoringError
from .fpgm import to_filter_matrix

__all__ = ["l1_scores", "l2_scores"]


def _norms(filters: torch.Tensor | np.ndarray, ord_: int) -> torch.Tensor:
    x = to_filter_matrix(filters).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ScoringError(
            f"weights of shape {tuple(x.shape)} contain NaN or Inf; norms need finite values"
        )
    return torch.linalg.vector_norm(x, ord=ord_, dim=1)


@torch.no_grad()
def l1_scores(filters: torch.Tensor | np.ndarray) -> torch.Tensor:
    """L1 norm of each filter (larger = more important).

    Args:
        filters: ``(N, ...)`` tensor or array; axis 0 indexes filters.

    Returns:
        ``(N,)`` float64 CPU tensor.

    Raises:
        ScoringError: Non-finite weights.
    """
    return _norms(filters, 1)


@torch.no_grad()
def l2_scores(filters: torch.Tensor | np.ndarray) -> torch.Tensor:
    """L2 norm of each filter (larger = more important).

    Args:
        filters: ``(N, ...)`` tensor or array; axis 0 indexes filters.

    Returns:
        ``(N,)`` float64 CPU tensor.

    Raises:
        ScoringError: Non-finite weights.
    """
    return _norms(filters, 2)

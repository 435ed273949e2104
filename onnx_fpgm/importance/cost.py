"""What scoring a group by FPGM costs, estimated from its shape before any distance is computed.

FPGM compares every filter with every other: ``N^2`` pairs of ``D``-long filters, with no exact
shortcut for a sum of distances. A 1M-output Gemm (``D`` = 4) is 1e12 pairs (extrapolated
to ~50 minutes in issue 19); ordinary layers are far below: VGG's 4096 x 25088 classifier is
4.2e11 work units and scores in 4.6 s (``benchmarks/fpgm_core.py --large``, RESULTS.md).
A group over the budget is left whole with a reason that names the cost and the way out
(``--criterion l2``/``l1`` rank by norms in ``O(N D)``).

Work units are multiply-add equivalents of the Euclidean Gram pass, measured with
``fpgm_select`` on 2 shared cores (float32, CPU, load 2-8): a GEMM multiply-add per weight
pair, plus ~128 per filter pair for the elementwise passes (``N^2`` adds, square roots, bound
sums; they dominate for short filters: 16384 x 4 took 0.45 s), and ~64 per weight pair for the
Manhattan distance (``cdist(p=1)`` is no GEMM: 4096 x 512 took 21.5 s, against 0.37 s for L2).
Those machines did 2e10-6e10 units per second (load 8 and 2), so the default budget
(``PruneConfig.max_scoring_work``, 1e13) is some minutes there (seconds on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..deps.channels import Analysis
from ..model.memory import available_bytes
from .group import group_width

#: Work units per filter pair beyond the multiply-adds (the elementwise passes over a block).
PAIR_WORK = 128
#: Work units per weight pair of the Manhattan distance.
L1_WORK = 64
#: Elements of the distance block the Gram pass holds (``_distances._CPU_BLOCK_ELEMS``).
BLOCK_ELEMS = 1 << 20
#: Share of the available memory one group's scoring may take.
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class ScoringCost:
    """One group's FPGM scoring, estimated: ``n`` filters of ``d`` weights."""

    n: int
    d: int
    work: float  # work units (see the module docstring)
    peak_bytes: int  # filters (float32 and float64 copies) and distance blocks, or N x N

    def over(self, max_work: float | None, memory_bytes: int) -> str | None:
        """Why scoring this group would overrun the budgets, or None when it fits."""
        shape = f"{self.n:,} x {self.n:,} distances of {self.d:,}-weight filters, O(N^2 D)"
        way_out = "--criterion l2 (or l1) ranks them by norm in O(N D)"
        if max_work is not None and self.work > max_work:
            return (f"scoring by FPGM would take ~{self.work:.1e} multiply-adds ({shape}; "
                    f"the budget is {max_work:.0e}, max_scoring_work): {way_out}")
        if self.peak_bytes > memory_bytes * MEMORY_SHARE:
            return (f"scoring by FPGM would need ~{self.peak_bytes / 2**30:.1f} GiB ({shape}), "
                    f"more than half the {memory_bytes / 2**30:.1f} GiB of memory available: "
                    f"{way_out}")
        return None


def fpgm_cost(n: int, d: int, dist: object = 2) -> ScoringCost:
    """The estimate for ``n`` filters of ``d`` weights under ``dist`` (1, 2 or a callable,
    which gets the whole float64 ``(N, N)`` matrix)."""
    per_weight = L1_WORK if dist == 1 else 1
    work = float(n) * float(n) * (per_weight * d + PAIR_WORK)
    peak = n * d * (4 + 8 + 8) + 16 * max(n, BLOCK_ELEMS) + 64 * n
    if callable(dist):
        peak += 3 * 8 * n * n  # the callable's result, its float64 copy and its absolute value
    return ScoringCost(n, d, work, peak)


def freeze_costly_groups(analysis: Analysis, dist: object, max_work: float | None) -> int:
    """Leave whole (``group.frozen``) every group whose FPGM scoring would overrun the budgets;
    returns how many. Runs before any group is scored, so planning, allocation to a target and
    the sensitivity probes all see those groups frozen."""
    memory = None
    frozen = 0
    for group in analysis.groups:
        if group.frozen or group.n_channels < 2:
            continue
        cost = fpgm_cost(group.n_channels, group_width(analysis, group), dist)
        if (max_work is None or cost.work <= max_work) and cost.peak_bytes < 1 << 28:
            continue  # clearly fits: no need to read the memory
        memory = available_bytes() if memory is None else memory
        reason = cost.over(max_work, memory)
        if reason:
            group.frozen = reason
            frozen += 1
    return frozen

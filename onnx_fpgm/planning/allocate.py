"""Prune to a target (a fraction of the original MACs or params): how many channels each group
keeps.

Three ways to spread the budget (``--allocation``):

* ``uniform``: one sparsity for every group, found by bisection; to land on the target, some
  groups then give back one channel (the sparsities differ by at most one channel).
* ``global``: every channel of every group is ranked by its normalised score (the criterion's
  score divided by the group's mean score) per MAC (or param) its removal saves; the cheapest
  prefix of that ranking that meets the target goes.
* ``sensitivity``: each group alone is pruned at a few sparsities and the loss on calibration
  data is measured (``sensitivity.py``: the masked model downstream of the group, 16 samples
  per probe, harmful groups' higher and cheap groups' lower sparsities estimated; with
  lstsq/obs/auto compensation, after the closed-form OBS update of the consumers; with bias,
  after a real rewrite and bias fold per probe); then, greedily, the group with the least
  loss per MAC (param) saved gives up its next step of channels until the target is met.

Costs come from the analytic ``CostModel``; the search keeps the plan with the most channels
whose cost is at most the target, so a target is met to within one channel's worth (one step of
one group). Groups that must keep equal counts (the blocks of a grouped conv) move together.
Head dims are groups like the others (the cost model counts them within the kept heads); like
whole heads at ``--sparsity`` they keep at least one and are not rounded (``plan.py``), and
``--keep-head-dims`` leaves them whole.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import PruneConfig
from ..deps.channels import Analysis, Group
from ..errors import ConfigError
from ..measure.calibration import load_calibration
from ..model import io, mapped
from ..recover.obs import ObsCriterion
from .costmodel import CostModel, build_cost_model
from .plan import group_keep, n_to_keep, plan_pruning
from .sensitivity import measure_compensated_sensitivity, measure_sensitivity

logger = logging.getLogger(__name__)

#: Sparsities at which each group's sensitivity is measured.
SENSITIVITY_LEVELS = (0.2, 0.4, 0.6, 0.8)
#: Loss assumed when a group keeps nothing (its output is gone: relative error 1), the end
#: point of the extrapolation past the last measured level.
FULL_REMOVAL_LOSS = 1.0
#: Steps per group in the greedy sensitivity allocation (refined to one channel at the end).
GREEDY_STEPS = 16


@dataclass
class TargetOutcome:
    """What a target run decided and reached (the report's ``target`` section)."""

    metric: str
    target: float
    allocation: str
    estimated: float  # cost model's ratio of the chosen plan
    best_reachable: float
    achieved: float | None = None  # measured on the rewritten model
    groups: list[dict] = field(default_factory=list)  # id, producers, channels, kept, sparsity
    sensitivity: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)  # latency targets: the timed trials

    def summary(self) -> str:
        what = {"macs": "MACs", "params": "params"}.get(self.metric, self.metric)
        achieved = self.achieved if self.achieved is not None else self.estimated
        return (f"target {what} {self.target:.4g} of the original: reached {achieved:.4f} "
                f"({self.allocation} allocation)")


class Allocator:
    """Keep counts per group for a target, on one analysis (reusable across targets)."""

    def __init__(self, analysis: Analysis, graph: gs.Graph, original: onnx.ModelProto,
                 config: PruneConfig, metric: str) -> None:
        self.analysis = analysis
        self.config = config
        self._original = original
        self.model: CostModel = build_cost_model(analysis, graph, original, metric,
                                                 dict(config.input_shapes))
        self.n = np.array([g.n_channels for g in analysis.groups], dtype=np.int64)
        self.base = self.n.copy()
        self.units: list[list[int]] = []
        self._build_units()
        #: Per unit (tuple of group ids): normalised scores / measured loss per level.
        self.scores: dict[tuple[int, ...], np.ndarray] = {}
        self.sensitivity: dict[tuple[int, ...], np.ndarray] = {}

    # ---- setup ----
    def _build_units(self) -> None:
        config, analysis = self.config, self.analysis
        free = np.zeros(len(self.n), dtype=bool)
        for group in analysis.groups:
            if group.frozen or config.is_excluded(group.producers) or \
                    (group.dims and config.keep_head_dims):
                continue
            fixed = config.layer_sparsity_for(group.producers)
            if fixed is not None:  # --layer-sparsity fixes this group
                self.base[group.id] = self.keep_at(group.id, fixed)
                continue
            if self.floor(group.id) < group.n_channels:
                free[group.id] = True
        parent = list(range(len(self.n)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        group_of_class = analysis.group_of_class
        for _, blocks in analysis.balanced:
            labels = np.concatenate([b[b >= 0] for b in blocks]) if blocks else np.zeros(0, int)
            gids = np.unique(group_of_class[analysis.class_of_atom[labels]]).tolist()
            for gid in gids[1:]:
                parent[find(gid)] = find(gids[0])
        members: dict[int, list[int]] = {}
        for gid in range(len(self.n)):
            members.setdefault(find(gid), []).append(gid)
        for unit in members.values():
            if all(free[g] for g in unit) and len({int(self.n[g]) for g in unit}) == 1:
                self.units.append(unit)

    def keep_at(self, gid: int, sparsity: float) -> int:
        """What the group keeps at ``sparsity``, counted as ``plan.py`` counts it."""
        return group_keep(self.analysis.groups[gid], int(self.n[gid]), sparsity, self.config)

    def floor(self, gid: int) -> int:
        return self.keep_at(gid, 1.0)

    def legal(self, gid: int, keep: int) -> int:
        """The kept count a group can have at or above ``keep`` (min channels, round-to)."""
        n = int(self.n[gid])
        return self.keep_at(gid, (n - max(int(keep), 0)) / n) if n else 0

    def with_units(self, keep_per_unit: list[int]) -> np.ndarray:
        keep = self.base.copy()
        for unit, k in zip(self.units, keep_per_unit):
            keep[unit] = k
        return keep

    def best_reachable(self) -> float:
        return float(self.model.ratio(self.with_units([self.floor(u[0]) for u in self.units])))

    # ---- allocation ----
    def allocate(self, target: float, how: str, *, select=None, channel_scores=None,
                 calibration=None, progress_factory=None) -> np.ndarray:
        """Kept count per group (index = group id) whose cost ratio is at most ``target``."""
        full = self.with_units([int(self.n[u[0]]) for u in self.units])
        if self.model.ratio(full) <= target:
            return full
        best = self.best_reachable()
        if best > target + 1e-12:
            what = "MACs" if self.model.metric == "macs" else "params"
            raise ConfigError(f"target {what} {target:.4g} of the original is not reachable: the "
                              f"best reachable is {best:.4f} (every prunable group at "
                              f"--min-channels {self.config.min_channels})")
        if how == "uniform":
            return self._uniform(target)
        if how == "global":
            return self._global(target, self.unit_scores(channel_scores))
        return self._sensitivity(target, select, calibration, progress_factory)

    def _uniform(self, target: float) -> np.ndarray:
        def keep_at(s: float) -> list[int]:
            return [self.keep_at(u[0], s) for u in self.units]

        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if self.model.ratio(self.with_units(keep_at(mid))) <= target:
                hi = mid
            else:
                lo = mid
        keep, above = keep_at(hi), keep_at(lo)
        for i in range(len(self.units)):  # give back the channels that overshoot the target
            if above[i] > keep[i]:
                trial = list(keep)
                trial[i] = above[i]
                if self.model.ratio(self.with_units(trial)) <= target:
                    keep = trial
        return self.with_units(keep)

    def unit_scores(self, select_scores: Callable[[Group], np.ndarray]) -> list[np.ndarray]:
        """Per unit: normalised scores, ascending (the order channels go in), mean over members."""
        for unit in self.units:
            if tuple(unit) in self.scores:
                continue
            rows = []
            for gid in unit:
                s = np.sort(np.asarray(select_scores(self.analysis.groups[gid]), np.float64))
                mean = float(np.mean(s)) if len(s) else 1.0
                rows.append(s / mean if mean > 0 else np.zeros_like(s))
            self.scores[tuple(unit)] = np.mean(rows, axis=0)
        return [self.scores[tuple(unit)] for unit in self.units]

    def _step_costs(self, keep_units: list[int], steps: list[int]) -> np.ndarray:
        """Cost saved when each unit alone goes from ``keep_units`` down to ``steps``."""
        current = self.with_units(keep_units)
        batch = np.repeat(current[None], len(self.units), axis=0)
        for i, (unit, k) in enumerate(zip(self.units, steps)):
            batch[i, unit] = k
        return self.model.cost(current) - self.model.cost(batch)

    def _global(self, target: float, scores: list[np.ndarray]) -> np.ndarray:
        full = [int(self.n[u[0]]) for u in self.units]
        per_channel = self._step_costs(full, [k - 1 for k in full])
        entries = []  # (key, unit)
        for i, unit in enumerate(self.units):
            removable = full[i] - self.floor(unit[0])
            cost = max(float(per_channel[i]), 0.0)
            key = scores[i][:removable] / cost if cost > 0 else np.full(removable, np.inf)
            entries.extend((float(k), i) for k in key)
        order = sorted(range(len(entries)), key=lambda e: (entries[e][0], entries[e][1]))
        units_in_order = np.array([entries[e][1] for e in order], dtype=np.int64)

        def keep_for(length: int) -> list[int]:
            removed = np.bincount(units_in_order[:length], minlength=len(self.units))
            return [self.legal(u[0], full[i] - int(removed[i])) for i, u in enumerate(self.units)]

        lo, hi = 0, len(units_in_order)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.model.ratio(self.with_units(keep_for(mid))) <= target:
                hi = mid
            else:
                lo = mid + 1
        return self.with_units(keep_for(lo))

    def _sensitivity(self, target: float, select, calibration, progress_factory) -> np.ndarray:
        levels = SENSITIVITY_LEVELS
        missing = [unit for unit in self.units if tuple(unit) not in self.sensitivity]
        if missing:
            groups = [[self.analysis.groups[g] for g in unit] for unit in missing]
            advance = progress_factory("sensitivity", len(groups) * len(levels)) \
                if progress_factory else None

            def counts(unit: list[Group], s: float) -> list[int]:
                return [self.legal(g.id, n_to_keep(g.n_channels, s, 1, None)) for g in unit]

            mode = self.config.compensate
            if mode != "bias":  # with lstsq/obs/auto: what the OBS update cannot recover
                original = mapped.with_data(self._original) if mode != "none" else \
                    self._original  # the update reads the weights there
                losses = measure_sensitivity(original, self.analysis, groups, levels,
                                             select, calibration, counts, advance,
                                             update=mode != "none")
            else:  # what the bias fold cannot recover: one rewrite and fit per probe
                original = mapped.with_data(self._original)  # compensation reads weights there
                losses = measure_compensated_sensitivity(
                    original, io.infer_shapes(io.light_copy(original)),
                    io.default_opset(original), self.analysis, groups, levels, select,
                    calibration, counts, mode, advance)
            for unit, row in zip(missing, np.maximum.accumulate(losses, axis=1)):
                self.sensitivity[tuple(unit)] = row  # made monotone in sparsity
        curves = [self.sensitivity[tuple(unit)] for unit in self.units]
        full = [int(self.n[u[0]]) for u in self.units]
        keep = list(full)
        floors = [self.floor(u[0]) for u in self.units]
        xs = np.concatenate([[0.0], np.asarray(levels)])

        def loss(i: int, k: int) -> float:
            s = 1.0 - k / full[i]
            ys = np.concatenate([[0.0], curves[i]])
            if s <= xs[-1]:
                return float(np.interp(s, xs, ys))
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            linear = ys[-1] + max(slope, 0.0) * (s - xs[-1])
            # towards no channel left (relative error 1): a group that was cheap up to the last
            # level is not assumed cheap down to one channel (measured: MNIST, obs + lstsq at
            # 0.3 MACs emptied the last stage to 1 of 128 channels, 24 % top-1)
            whole = ys[-1] + (max(ys[-1], FULL_REMOVAL_LOSS) - ys[-1]) * (s - xs[-1]) / (
                1.0 - xs[-1])
            return float(max(linear, whole))

        def next_step(i: int) -> int:
            gid = self.units[i][0]
            k = self.legal(gid, keep[i] - max(1, round(full[i] / GREEDY_STEPS)))
            if k >= keep[i]:  # rounded back up: one multiple of round_to down instead
                k = self.legal(gid, keep[i] - (self.config.round_to or 1))
            return max(floors[i], k)

        last = None
        while self.model.ratio(self.with_units(keep)) > target:
            steps = [next_step(i) if keep[i] > floors[i] else keep[i]
                     for i in range(len(self.units))]
            saved = self._step_costs(keep, steps)
            best, best_key = None, None
            for i in range(len(self.units)):
                if steps[i] >= keep[i] or saved[i] <= 0:
                    continue
                key = ((loss(i, steps[i]) - loss(i, keep[i])) / saved[i], -saved[i])
                if best_key is None or key < best_key:
                    best, best_key = i, key
            if best is None:
                break
            last = (best, keep[best])
            keep[best] = steps[best]
        if last is not None:  # refine the last step to one channel
            i, before = last
            for k in range(before - 1, keep[i], -1):
                trial = list(keep)
                trial[i] = self.legal(self.units[i][0], k)
                if trial[i] > keep[i] and self.model.ratio(self.with_units(trial)) <= target:
                    keep = trial
                    break
        return self.with_units(keep)

    def outcome(self, target: float, how: str, keep: np.ndarray) -> TargetOutcome:
        groups = [{"id": g.id, "producers": g.producers, "channels": g.n_channels,
                   "kept": int(keep[g.id]),
                   "sparsity": round(1 - int(keep[g.id]) / g.n_channels, 6)}
                  for g in self.analysis.groups if keep[g.id] < g.n_channels]
        sensitivity = []
        for unit in self.units:
            row = self.sensitivity.get(tuple(unit))
            if row is not None:
                sensitivity.append({"groups": unit, "levels": list(SENSITIVITY_LEVELS),
                                    "loss": [round(float(v), 6) for v in row]})
        return TargetOutcome(self.model.metric, target, how, float(self.model.ratio(keep)),
                             self.best_reachable(), groups=groups, sensitivity=sensitivity)


def plan_to_target(analysis: Analysis, graph: gs.Graph, original: onnx.ModelProto,
                   config: PruneConfig, select, progress_factory=None,
                   cache: dict | None = None):
    """Allocate for ``config.target`` and plan; returns ``(PrunePlan, TargetOutcome)``.

    ``cache`` (a dict the caller keeps) carries measured sensitivities and channel scores
    between runs on the same model and settings (a sweep).
    """

    metric, target = config.target
    how = config.resolved_allocation
    allocator = Allocator(analysis, graph, original, config, metric)
    cache = cache if cache is not None else {}
    # what is measured depends only on how a probe is compensated: not at all, by the bias fold,
    # or by the OBS update (lstsq/obs/sequential/auto): modes that probe alike share one entry
    probe = config.compensate if config.compensate in ("none", "bias") else "updated"
    measured = f"sensitivity/{probe}"
    allocator.sensitivity = cache.setdefault(measured, {})  # filled in place
    allocator.scores = cache.setdefault("scores", {})
    calibration = load_calibration(config.calibration, original, config) \
        if how == "sensitivity" else None
    keep = allocator.allocate(target, how, select=select,
                              channel_scores=channel_scorer(analysis, config, select),
                              calibration=calibration, progress_factory=progress_factory)
    counts = {g.id: int(keep[g.id]) for g in analysis.groups}
    plan = plan_pruning(analysis, config, select, None, counts)
    lost = [gp.group_id for gp in plan.groups
            if gp.frozen and counts[gp.group_id] < gp.n_channels]
    if lost:  # groups the planner had to freeze (a tensor would be emptied): spread anew
        allocator.base[lost] = allocator.n[lost]
        allocator.units = [u for u in allocator.units if not set(u) & set(lost)]
        keep = allocator.allocate(target, how, select=select,
                                  channel_scores=channel_scorer(analysis, config, select),
                                  calibration=calibration, progress_factory=progress_factory)
        counts = {g.id: int(keep[g.id]) for g in analysis.groups}
        plan = plan_pruning(analysis, config, select, None, counts)
    keep = np.array([gp.n_keep for gp in plan.groups], dtype=np.int64)
    return plan, allocator.outcome(target, how, keep)


def channel_scorer(analysis: Analysis, config: PruneConfig,
                   select=None) -> Callable[[Group], np.ndarray]:
    """Per-channel score of a group by the configured criterion (smaller goes first); an
    ``ObsCriterion`` selection brings its own (the greedy pass' costs)."""
    if isinstance(select, ObsCriterion):
        return select.scores
    # importance imports torch: loaded on first use, off the start-up path
    from ..importance.fpgm import fpgm_scores, resolve_device
    from ..importance.group import group_filters
    from ..importance.norms import l1_scores, l2_scores

    device = resolve_device(config.device)

    def scores(group: Group) -> np.ndarray:
        if config.criterion == "random":
            return np.random.default_rng([config.seed, group.id]).random(group.n_channels)
        filters = group_filters(analysis, group)
        if config.criterion in ("l1", "l2"):
            return (l1_scores if config.criterion == "l1" else l2_scores)(filters).numpy()
        return fpgm_scores(filters, dist=config.dist, device=device).numpy()

    return scores

"""Which channels go: per-group counts (sparsity, min_channels, round_to) and FPGM selection."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import PruneConfig
from ..deps.channels import Analysis, Group


@dataclass
class GroupPlan:
    """The decision for one group.

    Attributes:
        group_id: index into the analysis' groups.
        producers: node names whose filters form the group.
        n_channels: channels before pruning.
        keep_idxs: kept channel positions within the group (sorted).
        sparsity: the sparsity asked for this group.
        frozen: why the group is left whole, or None.
    """

    group_id: int
    producers: list[str]
    n_channels: int
    keep_idxs: np.ndarray
    sparsity: float
    frozen: str | None = None

    @property
    def n_keep(self) -> int:
        return len(self.keep_idxs)


@dataclass
class PrunePlan:
    """Decisions for every group; ``removed_classes`` are the class ids that go."""

    groups: list[GroupPlan]
    removed_classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_removed(self) -> int:
        return len(self.removed_classes)


def n_to_keep(n: int, sparsity: float, min_channels: int, round_to: int | None) -> int:
    """Channels a group of ``n`` keeps.

    ``round(sparsity * n)`` channels go (Python rounding, as the FPGM reference), never leaving
    fewer than ``min_channels``. With ``round_to`` the kept count is rounded up to a multiple of
    it; a group too small to reach the next multiple keeps all its channels.
    """
    keep = n - round(sparsity * n)
    keep = max(keep, min(min_channels, n))
    if round_to and round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
        if keep > n:
            keep = n
    return keep


def group_keep(group: Group, n: int, sparsity: float, config: PruneConfig) -> int:
    """What ``group`` (of ``n`` channels) keeps at ``sparsity``: whole heads and a head's dims
    keep at least one and are not rounded; channels follow min channels and round-to."""
    if group.heads or group.dims:
        return n_to_keep(n, sparsity, 1, None)
    return n_to_keep(n, sparsity, config.min_channels, config.round_to)


#: ``select(analysis, group, n_prune)`` -> positions (within the group) of the channels to remove.
SelectFn = Callable[[Analysis, Group, int], np.ndarray]


def plan_pruning(analysis: Analysis, config: PruneConfig, score: SelectFn,
                 progress: Callable[[int], None] | None = None,
                 keep_counts: dict[int, int] | None = None) -> PrunePlan:
    """Decide, group by group, which channels to keep (smallest FPGM scores are removed).

    ``keep_counts`` (group id -> channels kept) overrides the configured sparsity of those
    groups (a target's allocation); frozen and excluded groups stay whole regardless.

    A group whose channels are not all owned by the same members (a ShuffleNet stage: each
    unit's branch owns fewer of the stage's shuffled channels than the one before) is selected
    part by part, one part per set of owners, the same fraction from each: FPGM compares channels
    in one joint filter space, which such channels do not share, and each layer then loses its
    share of the channels. A group whose selection would empty a tensor it shares with other
    channels (one half of a shuffled, then chunked, width) is selected again with that tensor's
    channels as a further cut; only if that fails too is it frozen.
    """
    extra_frozen: dict[int, str] = {}
    owners = {group.id: owner_signature(analysis, group) for group in analysis.groups
              if not group.frozen and len(group.members) > 1}
    strata: dict[int, list[np.ndarray]] = {
        gid: parts for gid, sig in owners.items()
        if len(parts := _by_owners(sig)) > 1}
    #: groups cut by owners: parts ordered from the most owned, and the most each may lose
    caps = {gid: [len(p) for p in parts] for gid, parts in strata.items()}
    cutting: dict[int, list[str]] = {}  # group -> tensors whose parts it keeps proportionally
    for _ in range(16):
        plan = _plan_once(analysis, config, score, extra_frozen, progress, keep_counts or {},
                          strata, caps)
        emptied = emptied_groups(analysis, plan)
        if not emptied:
            return plan
        for gid, reason in emptied.items():
            prefix = "pruning would empty tensor "
            name = reason[len(prefix):] if reason.startswith(prefix) else None
            parts, part_caps = None, None
            if name is not None and name not in cutting.get(gid, []):
                parts, part_caps = _strata(analysis, gid, [*cutting.get(gid, []), name],
                                           owners.get(gid))
            if parts is None:
                extra_frozen[gid] = reason
            else:
                cutting.setdefault(gid, []).append(name)
                strata[gid] = parts
                caps.pop(gid, None)
                if part_caps is not None:
                    caps[gid] = part_caps
        progress = None
    raise RuntimeError("could not find a plan that empties no tensor")


def _plan_once(analysis, config, score, extra_frozen, progress, keep_counts,
               strata, caps) -> PrunePlan:
    plans: list[GroupPlan] = []
    removed: list[np.ndarray] = []
    for group in analysis.groups:
        n = group.n_channels
        frozen = group.frozen or extra_frozen.get(group.id)
        sparsity = config.sparsity_for(group.producers, group.heads)
        if frozen is None:
            pattern = config.is_excluded(group.producers)
            frozen = f"excluded by --exclude {pattern}" if pattern else None
        if frozen is None and group.dims and config.keep_head_dims:
            frozen = "head dims kept (keep_head_dims)"
        keep_n = n if frozen else group_keep(group, n, sparsity, config)
        if not frozen and group.id in keep_counts:
            keep_n = int(keep_counts[group.id])
            sparsity = 1.0 - keep_n / n if n else 0.0
        if keep_n >= n:
            keep = np.arange(n, dtype=np.int64)
        else:
            gone = np.zeros(n, dtype=bool)
            parts = strata.get(group.id, [np.arange(n)])
            sizes = [len(p) for p in parts]
            shares = _nested_share(n - keep_n, sizes, caps[group.id]) if group.id in caps \
                else _share(n - keep_n, sizes)
            if shares is None:  # the parts cannot each keep one: select as one (then frozen)
                parts, shares = [np.arange(n)], [n - keep_n]
            for part, n_prune in zip(parts, shares):
                if not n_prune:
                    continue
                if n_prune == len(part):  # a part owned by few members goes whole
                    gone[part] = True
                    continue
                whole = len(part) == n
                chosen = score(analysis, group if whole else Group(
                    group.id, group.classes[part], group.members, group.producers,
                    heads=group.heads, dims=group.dims), n_prune)
                gone[part[np.asarray(chosen, dtype=np.int64)]] = True
                if np.count_nonzero(gone[part]) != n_prune:
                    raise RuntimeError(f"selection for group {group.id} returned a wrong count")
            keep = np.flatnonzero(~gone).astype(np.int64)
            removed.append(group.classes[gone])
        if progress is not None:
            progress(1)
        plans.append(GroupPlan(group.id, group.producers, n, keep, sparsity, frozen))
    removed_classes = np.sort(np.concatenate(removed)) if removed else np.zeros(0, np.int64)
    return PrunePlan(plans, removed_classes)


def _share(total: int, sizes: list[int]) -> list[int] | None:
    """Split ``total`` removals over parts of ``sizes`` in proportion (largest remainders),
    every part keeping at least one channel; None when that is impossible."""
    if total > sum(sizes) - len(sizes):
        return None
    exact = [total * size / sum(sizes) for size in sizes]
    counts = [min(int(e), size - 1) for e, size in zip(exact, sizes)]
    while sum(counts) < total:
        room = [i for i in range(len(sizes)) if counts[i] < sizes[i] - 1]
        counts[min(room, key=lambda i: counts[i] - exact[i])] += 1
    return counts


def _by_owners(signature: np.ndarray) -> list[np.ndarray]:
    """Channel positions per owner signature, the most owned first (``owner_signature``)."""
    ids = np.unique(signature)
    return [np.flatnonzero(signature == v) for v in ids[np.argsort(-(ids >> 32), kind="stable")]]


def owner_signature(analysis: Analysis, group: Group) -> np.ndarray:
    """One id per channel of ``group``: channels with the same id are owned (have filter rows)
    in exactly the same members; ids are dense from 0 plus (bits 32 up) the number of owners."""
    position = np.full(len(analysis.class_blocked) + 1, -1, dtype=np.int64)  # -1: no class
    position[group.classes] = np.arange(group.n_channels)
    owned = np.zeros((group.n_channels, len(group.members)), dtype=bool)
    for column, member_id in enumerate(group.members):
        pos = position[analysis.class_of(group)[analysis.members[member_id].atoms]]
        owned[pos[pos >= 0], column] = True
    ids = np.unique(owned, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return ids | (owned.sum(axis=1).astype(np.int64) << 32)


def _nested_share(total: int, sizes: list[int], caps: list[int]) -> list[int] | None:
    """Split ``total`` removals over parts ordered from the most to the least owned so that
    every prefix (the channels of a member owning exactly those parts, in a nested family such
    as a ShuffleNet stage) loses its rounded share, keeping at least one; part ``i`` loses at
    most ``caps[i]`` (its size, or one less where a cut tensor keeps a channel of it), the
    rest going to the last parts with room. None when the caps cannot take ``total``."""
    n = sum(sizes)
    counts, before, prefix = [], 0, 0
    for size, cap in zip(sizes, caps):
        prefix += size
        target = total if prefix == n else min((2 * total * prefix + n) // (2 * n), prefix - 1)
        counts.append(min(max(target - before, 0), cap))
        before += counts[-1]
    for i in reversed(range(len(sizes))):
        extra = min(total - before, caps[i] - counts[i])
        counts[i] += extra
        before += extra
    return counts if before == total else None


def _strata(analysis: Analysis, gid: int, names: list[str], owners: np.ndarray | None = None
            ) -> tuple[list[np.ndarray] | None, list[int] | None]:
    """The group's channel positions split by which of the tensors ``names`` hold them; given
    ``owners``, by their owner signature too, the most owned first, with the most each part may
    lose (each named tensor keeps one channel of its least owned part)."""
    labels_of = dict(analysis.all_labels())
    group = analysis.groups[gid]
    signature = np.zeros(group.n_channels, dtype=np.int64)
    for bit, name in enumerate(names):
        labels = labels_of.get(name)
        if labels is None:
            return None, None
        inside = np.isin(group.classes, analysis.class_of_atom[labels[labels >= 0]])
        if inside.all() or not inside.any():
            return None, None
        signature |= inside.astype(np.int64) << bit
    if owners is None:
        return [np.flatnonzero(signature == v) for v in np.unique(signature)], None
    ids = np.unique(signature | owners << len(names))
    ids = ids[np.argsort(-(ids >> (32 + len(names))), kind="stable")]
    parts = [np.flatnonzero((signature | owners << len(names)) == v) for v in ids]
    caps = [len(p) for p in parts]
    for bit in range(len(names)):  # the tensor keeps a channel of its least owned part
        inside = [k for k, v in enumerate(ids) if v >> bit & 1]
        caps[inside[-1]] = len(parts[inside[-1]]) - 1
    return parts, caps


def emptied_groups(analysis: Analysis, plan: PrunePlan) -> dict[int, str]:
    """Groups whose removal would empty a tensor or unbalance the groups of a grouped conv."""
    if not plan.n_removed:
        return {}
    removed = analysis.removed_atoms(plan.removed_classes)
    group_of_class = analysis.group_of_class
    result: dict[int, str] = {}
    for name, labels in analysis.all_labels():
        if removed[labels].all():
            for gid in np.unique(group_of_class[analysis.class_of_atom[labels]]).tolist():
                result[gid] = f"pruning would empty tensor {name}"
    for what, blocks in analysis.balanced:
        kept = {int(np.count_nonzero(~removed[b])) for b in blocks}
        if len(kept) > 1:
            labels = np.concatenate([b[b >= 0] for b in blocks])
            for gid in np.unique(group_of_class[analysis.class_of_atom[labels]]).tolist():
                result[gid] = f"{what} needs the same channel count in every group"
    return result

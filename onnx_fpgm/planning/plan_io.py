"""Re-apply a saved plan: the kept channels of a report (``--report``) on this model or another
export of the same network (BN folded or not, fp16, dynamic batch, the other torch exporter).

Producers are matched by node name when every producer of the plan is found by name with the
same channel count and filter size; otherwise (exporters name nodes differently) by position:
the producers of both models, in graph order, must agree one to one in op family, channel count
and filter size. Coupled channels must agree (a residual's producers keep the same channels),
frozen groups must keep everything, and no tensor may be emptied; else the plan is refused with
the first reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..deps.channels import Analysis
from ..errors import PlanError
from .plan import GroupPlan, PrunePlan, emptied_groups

_FAMILY = {"Gemm": "linear", "MatMul": "linear", "Conv": "conv", "ConvTranspose": "convT"}


#: A saved plan larger than this is no report of ours (a report is a few KB per layer).
PLAN_MAX_BYTES = 64 << 20


def read_plan_layers(path: str | Path) -> list[dict]:
    """The ``layers`` of a saved report, validated strictly: every ``kept`` list holds
    integers (not booleans) in range, unique and sorted, as ``--report`` writes them.

    Raises:
        PlanError: unreadable, too large, too deeply nested, or malformed.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(PLAN_MAX_BYTES + 1)
        if len(raw) > PLAN_MAX_BYTES:
            raise PlanError(f"{path}: over {PLAN_MAX_BYTES >> 20} MiB; not a saved report")
        data = json.loads(raw)
    except RecursionError as err:
        raise PlanError(f"{path}: JSON nested too deeply; not a saved report") from err
    except (OSError, ValueError) as err:
        raise PlanError(f"{path}: not a readable JSON report ({err})") from err
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise PlanError(f"{path}: no 'layers' list; write the plan with --report")
    for layer in layers:
        reason = _check_layer(layer)
        if reason:
            raise PlanError(f"{path}: layer entry {str(layer)[:60]} is malformed ({reason})")
    return layers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layer(layer: object) -> str | None:
    """Why a plan's layer entry is malformed, or None."""
    if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
        return "no name"
    n, kept = layer.get("channels_before"), layer.get("kept")
    if not _is_int(n) or n < 1 or not isinstance(kept, list) or not kept:
        return "channels_before and a non-empty kept list are needed"
    if not all(_is_int(k) for k in kept):
        return "kept indices must be integers"
    if not all(0 <= k < n for k in kept):
        return f"kept indices must lie in 0..{n - 1}"
    if any(a >= b for a, b in zip(kept, kept[1:])):
        return "kept indices must be unique and sorted"
    size = layer.get("filter_size")
    if size is not None and (not _is_int(size) or size < 1):
        return "filter_size must be a positive integer"
    return None


def plan_from_report(path: str | Path, analysis: Analysis) -> tuple[PrunePlan, str]:
    """The plan of a saved report on ``analysis``; returns it and how producers were matched.

    Raises:
        PlanError: the plan does not fit the model (the message says why).
    """
    layers = read_plan_layers(path)
    sources = analysis.sources
    sizes = [analysis.members[s.member].rows.shape[1] for s in sources]
    by_name = {s.node: i for i, s in enumerate(sources)}

    def fits(layer: dict, i: int) -> bool:
        size = layer.get("filter_size")
        return layer["channels_before"] == sources[i].n and (size is None or size == sizes[i])

    if all(layer["name"] in by_name and fits(layer, by_name[layer["name"]]) for layer in layers):
        matched, how = [(layer, by_name[layer["name"]]) for layer in layers], "node name"
    else:
        if len(layers) != len(sources):
            missing = next((la["name"] for la in layers if la["name"] not in by_name), None)
            raise PlanError(f"plan does not fit: it has {len(layers)} producers, the model "
                            f"{len(sources)}" + (f" (no node {missing!r})" if missing else ""))
        for i, layer in enumerate(layers):
            family = _FAMILY.get(layer.get("op", ""), layer.get("op"))
            if family != _FAMILY.get(sources[i].op, sources[i].op) or not fits(layer, i):
                raise PlanError(
                    f"plan does not fit: producer {i} is {layer.get('op')} {layer['name']} with "
                    f"{layer['channels_before']} channels in the plan, {sources[i].op} "
                    f"{sources[i].node} with {sources[i].n} here")
        matched, how = [(layer, i) for i, layer in enumerate(layers)], "position"
    removed = np.zeros(analysis.n_atoms + 1, dtype=bool)
    for layer, i in matched:
        gone = np.setdiff1d(np.arange(sources[i].n), layer["kept"])
        removed[sources[i].start + gone] = True
    return _to_plan(analysis, removed), how


def _to_plan(analysis: Analysis, removed: np.ndarray) -> PrunePlan:
    # only producers' channels are in a plan: constant channels (padding)
    # and repeat_kv's copies follow their class
    produced = np.zeros(analysis.n_atoms, dtype=bool)
    for source in analysis.sources:
        produced[source.start:source.start + source.n] = True
    # a head dim goes when all its produced channels go; the rest is whole heads or channels
    first = analysis.n_base_classes
    dims = np.array([first + u for u, atoms in enumerate(analysis.dim_atoms)
                     if produced[atoms].any() and removed[atoms[produced[atoms]]].all()],
                    dtype=np.int64)
    by_dims = analysis.removed_atoms(dims)
    rest = np.unique(analysis.class_of_atom[np.flatnonzero(removed[:-1] & ~by_dims[:-1])])
    classes = np.concatenate([rest, dims])
    whole = analysis.removed_atoms(classes)
    disagree = np.flatnonzero(whole[:-1] & ~removed[:-1] & produced)
    if len(disagree):
        atom = int(disagree[0])
        source = next(s for s in analysis.sources if s.start <= atom < s.start + s.n)
        raise PlanError(f"plan does not fit: {source.node} keeps channel {atom - source.start}, "
                        "which channels coupled with it lose")
    groups = []
    for group in analysis.groups:
        gone = np.isin(group.classes, classes)
        if gone.any() and group.frozen:
            raise PlanError(f"plan does not fit: it removes channels of {group.producers[0]}, "
                            f"which cannot be pruned here ({group.frozen})")
        keep = np.flatnonzero(~gone).astype(np.int64)
        groups.append(GroupPlan(group.id, group.producers, group.n_channels, keep,
                                1.0 - len(keep) / group.n_channels, group.frozen))
    plan = PrunePlan(groups, np.sort(classes).astype(np.int64))
    emptied = emptied_groups(analysis, plan)
    if emptied:
        gid, reason = next(iter(emptied.items()))
        raise PlanError(f"plan does not fit: {reason} (group of "
                        f"{analysis.groups[gid].producers[0]})")
    return plan

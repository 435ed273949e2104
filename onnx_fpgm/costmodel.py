"""Analytic MACs/params of a candidate plan, derived once from the analysis.

Every MAC op and every sliced constant contributes a term ``c * r(a) * r(b)``: its size in the
original model times the kept fraction of (at most) two channel maps, e.g. a Conv's output map
and its input map, or a weight's filter axis and its input-channel axis. The kept fraction of a
map is the share of its positions whose channel survives. For per-group kept *counts* (the
search), a group's positions in a map are assumed to go in proportion (exact when a group's
channels appear equally often, as they do in Concat/Flatten maps); for a concrete plan the exact
positions are counted. ``count_macs``/``count_params`` of the rewritten model are the ground
truth; the tests check that the model agrees with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .bench import count_params, macs_by_node
from .deps.analysis import Analysis, ChannelMap
from .deps.constants import constant_node_value, root_constant

Metric = Literal["macs", "params"]
#: Ops whose 1-D parameters (scale, bias, mean, var) follow their input's channel axis 1.
_NORM_1D = frozenset({"BatchNormalization", "InstanceNormalization", "GroupNormalization"})


@dataclass
class CostModel:
    """``cost(keep)`` for kept counts per group, and ``exact(removed_atoms)`` for a plan.

    Attributes:
        metric: what is counted.
        total: the original model's count (``count_macs``/``count_params``).
        n_channels: channels per group (index = group id).
    """

    metric: Metric
    total: int
    n_channels: np.ndarray
    _labels: list[np.ndarray]  # per map: atom labels
    _share: np.ndarray  # (maps, groups): positions of group g in map m / n_channels[g]
    _fixed: np.ndarray  # (maps,): positions of unowned (-1) labels
    _coef: np.ndarray  # (terms,)
    _first: np.ndarray  # (terms,): map index or -1 (factor 1)
    _second: np.ndarray
    _constant: float  # the part of ``total`` no map touches

    def cost(self, keep: np.ndarray) -> np.ndarray:
        """Cost for kept counts ``keep`` of shape (groups,) or (batch, groups)."""
        keep = np.asarray(keep, dtype=np.float64)
        kept = keep @ self._share.T + self._fixed  # (..., maps)
        return self._combine(kept)

    def exact(self, removed_atoms: np.ndarray) -> int:
        """Cost of a concrete plan (``Analysis.removed_atoms`` mask), counting positions."""
        kept = np.array([np.count_nonzero(~removed_atoms[labels]) for labels in self._labels],
                        dtype=np.float64)
        return round(float(self._combine(kept)))

    def ratio(self, keep: np.ndarray) -> np.ndarray:
        return self.cost(keep) / self.total if self.total else np.ones(np.shape(keep)[:-1])

    def _combine(self, kept: np.ndarray) -> np.ndarray:
        lengths = np.array([len(labels) for labels in self._labels], dtype=np.float64)
        r = kept / np.maximum(lengths, 1)
        ones = np.ones((*r.shape[:-1], 1))
        r = np.concatenate([r, ones], axis=-1)  # index -1: factor 1
        return (self._coef * r[..., self._first] * r[..., self._second]).sum(-1) + self._constant


class _Builder:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.index: dict[int, int] = {}
        self.labels: list[np.ndarray] = []
        self.terms: list[tuple[float, int, int]] = []

    def map_index(self, cmap: ChannelMap | None) -> int:
        if cmap is None:
            return -1
        key = id(cmap.labels)
        if key not in self.index:
            self.index[key] = len(self.labels)
            self.labels.append(cmap.labels)
        return self.index[key]

    def add(self, coef: float, a: ChannelMap | None, b: ChannelMap | None = None) -> None:
        ia, ib = self.map_index(a), self.map_index(b)
        if ia == ib and ia >= 0:  # the same channels on both axes (depthwise): counted once
            ib = -1
        if ia < 0 and ib < 0:
            return
        self.terms.append((float(coef), ia, ib))


def build_cost_model(analysis: Analysis, graph: gs.Graph, original: onnx.ModelProto,
                     metric: Metric, input_shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> CostModel:
    """Derive the cost terms of ``metric`` from the (not yet rewritten) graph."""
    builder = _Builder(analysis)
    if metric == "macs":
        per_node = macs_by_node(original, input_shapes)
        total = sum(per_node.values())
        for node in graph.nodes:
            if node.outputs and node.outputs[0].name in per_node:
                out, contracted = _mac_maps(node, analysis)
                builder.add(per_node[node.outputs[0].name], out, contracted)
    else:
        total = count_params(original)
        seen: set[str] = set()
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                size, key = _stored_size(tensor)
                if key is None or key in seen:
                    continue
                seen.add(key)
                axes = _param_maps(node, index, size[1], analysis)
                if axes is not None:
                    builder.add(size[0], *axes)
    return _finish(builder, analysis, metric, total)


def _finish(builder: _Builder, analysis: Analysis, metric: Metric, total: int) -> CostModel:
    n_groups = len(analysis.groups)
    group_of_class = analysis.group_of_class
    share = np.zeros((len(builder.labels), n_groups))
    fixed = np.zeros(len(builder.labels))
    for m, labels in enumerate(builder.labels):
        owned = labels >= 0
        fixed[m] = np.count_nonzero(~owned)
        groups = group_of_class[analysis.class_of_atom[labels[owned]]]
        np.add.at(share[m], groups, 1.0)
    n_channels = np.array([g.n_channels for g in analysis.groups], dtype=np.int64)
    share /= np.maximum(n_channels, 1)
    coef = np.array([t[0] for t in builder.terms], dtype=np.float64)
    modelled = float(coef.sum())
    return CostModel(metric, int(total), n_channels, builder.labels, share, fixed, coef,
                     np.array([t[1] for t in builder.terms], dtype=np.int64),
                     np.array([t[2] for t in builder.terms], dtype=np.int64),
                     float(total) - modelled)


def _map(analysis: Analysis, tensor: gs.Tensor | None, axis: int | None = None,
         rank: int | None = None) -> ChannelMap | None:
    """The tensor's channel map when its channel axis is ``axis`` (negative: from the end)."""
    if tensor is None or not tensor.name:
        return None
    cmap = analysis.maps.get(tensor.name)
    if cmap is None and axis is None:
        return _split_as_map(analysis, tensor.name)
    if cmap is None or axis is None:
        return cmap
    if axis < 0:
        rank = rank if rank is not None else analysis.ranks.get(tensor.name)
        if rank is None:
            return None
        axis += rank
    return cmap if cmap.axis == axis else None


def _split_as_map(analysis: Analysis, name: str) -> ChannelMap | None:
    """A tensor whose channels are split over several axes (attention heads) as one flat map:
    the kept share of its positions is the kept share of its elements, which is what scales a
    MAC op's output (the scores and context of the heads kept)."""
    smap = analysis.split_maps.get(name)
    return None if smap is None else ChannelMap(smap.axes[0], smap.labels.reshape(-1))


def _attr(node: gs.Node, name: str, default: int = 0) -> int:
    return int(node.attrs.get(name, default))


def _mac_maps(node: gs.Node, analysis: Analysis) -> tuple[ChannelMap | None, ChannelMap | None]:
    """(map scaling the output's size, map scaling the contracted length) of a MAC op."""
    x = node.inputs[0] if node.inputs else None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    out = _map(analysis, node.outputs[0])
    if node.op == "Conv":
        return out, _map(analysis, x, 1)  # depthwise: the same map twice, counted once
    if node.op == "ConvTranspose":  # MACs = |input| * |W[1:]|; W[1] = output channels / group
        return _map(analysis, x, 1), out
    if node.op == "Gemm":
        contracted = _map(analysis, x, 0 if _attr(node, "transA") else 1) or \
            _map(analysis, w, 1 if _attr(node, "transB") else 0)
        return out, contracted
    return out, _map(analysis, x, -1) or _map(analysis, w, -2)  # MatMul


def _stored_size(tensor: gs.Tensor | None) -> tuple[tuple[int, tuple[int, ...]], str | None]:
    """(elements, shape) of a stored float constant behind ``tensor`` and its root's name."""
    if tensor is None:
        return (0, ()), None
    root = root_constant(tensor)
    if root is None:
        return (0, ()), None
    node = root[0]
    if isinstance(node, gs.Constant):
        values, key = node.values, node.name
    else:
        values, key = constant_node_value(node), node.outputs[0].name
    if values is None:
        return (0, ()), None
    shape = tuple(int(d) for d in np.shape(values))
    dtype = np.dtype(getattr(values, "dtype", np.float32))
    if dtype.kind != "f" and not dtype.name.startswith(("bfloat", "float")):
        return (0, ()), None  # shape parameters and indices: their element counts stay
    return (int(np.prod(shape, dtype=np.int64)), shape), key


def _param_maps(node: gs.Node, index: int, shape: tuple[int, ...], analysis: Analysis
                ) -> tuple[ChannelMap | None, ChannelMap | None] | None:
    """Maps along which the constant at ``node.inputs[index]`` is sliced (None: not at all)."""
    x = node.inputs[0]
    out = _map(analysis, node.outputs[0]) if node.outputs else None
    if node.op in ("Conv", "ConvTranspose") and index in (1, 2):
        xin = _map(analysis, x, 1)
        if index == 2:
            return out, None
        return (out, xin) if node.op == "Conv" else (xin, out)
    if node.op == "Gemm" and index in (1, 2):
        if index == 2:
            return _aligned(out, node.outputs[0], shape, analysis), None
        return out, _map(analysis, x, 0 if _attr(node, "transA") else 1)
    if node.op == "MatMul" and index == 1:
        return out, _map(analysis, x, -1)
    if node.op in _NORM_1D and len(shape) == 1 and index > 0:
        return _map(analysis, x, 1), None
    for tensor in [*node.inputs, *node.outputs]:
        if tensor is None or tensor is node.inputs[index]:
            continue
        found = _aligned(_map(analysis, tensor), tensor, shape, analysis)
        if found is not None:
            return found, None
    return None


def _aligned(cmap: ChannelMap | None, tensor: gs.Tensor, shape: tuple[int, ...],
             analysis: Analysis) -> ChannelMap | None:
    """``cmap`` when a constant of ``shape`` broadcast against ``tensor`` spans its channels."""
    if cmap is None:
        return None
    rank = analysis.ranks.get(tensor.name)
    if rank is None:
        return None
    axis = cmap.axis - (rank - len(shape))
    if 0 <= axis < len(shape) and shape[axis] == len(cmap.labels) and shape[axis] > 1:
        return cmap
    return None

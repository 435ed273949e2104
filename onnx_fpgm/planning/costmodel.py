"""Analytic MACs/params of a candidate plan, derived once from the analysis.

Every MAC op and every sliced constant contributes a term ``c * r(a) * r(b)``: its size in the
original model times the kept fraction of (at most) two channel maps, e.g. a Conv's output map
and its input map, or a weight's filter axis and its input-channel axis. The kept fraction of a
map is the share of its positions whose channel survives. For per-group kept *counts* (the
search), a group's positions in a map are assumed to go in proportion (exact when a group's
channels appear equally often, as they do in Concat/Flatten maps); for a concrete plan the exact
positions are counted. ``count_macs``/``count_params`` of the rewritten model are the ground
truth; the tests check that the model agrees with them.

Head dims (``deps/head_dims.py``) cut across the heads: a position of a head grid survives when
its head and its dim both do, so a map's kept fraction is the product of its kept share by the
groups of ``class_of_atom`` and its kept share by the head dims' groups. A contraction over
``head_dim`` (``q @ k^T``) scales with the kept dims alone: its map is marked *dims only*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..deps.channels import Analysis, ChannelMap
from ..deps.constants import constant_node_value, root_constant
from ..deps.handlers import recurrent
from ..deps.handlers.recurrent import hidden_output_map
from ..deps.op_families import FEATURE_AXIS, RECURRENT_OPS
from ..measure.bench import MAC_OPS, count_params, first_output, macs_by_node
from ..model.outer_scope import with_bodies

Metric = Literal["macs", "params"]
#: Ops whose 1-D parameters (scale, bias, mean, var) follow their input's channel axis 1.
_NORM_1D = frozenset({"BatchNormalization", "InstanceNormalization", "GroupNormalization"})
#: Inputs of a MAC op that hold one value per output channel (bias; quantized: the weight's
#: scale and zero point, the integer bias).
_PER_OUTPUT = {"Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,), "QLinearConv": (4, 5, 8),
               "ConvInteger": (3,), "QGemm": (4, 5, 6), "QLinearMatMul": (4, 5),
               "MatMulInteger": (3,), "MatMulNBits": (5,)}
#: Consumers whose integer constants are quantized weights and biases (counted as params).
_INTEGER_WEIGHTS = frozenset({"DequantizeLinear", "QLinearConv", "ConvInteger", "QGemm",
                              "QLinearMatMul", "MatMulInteger", "MatMulNBits"})


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
    _dim_share: np.ndarray  # (maps, groups): as _share, by the head dims' groups
    _dim_fixed: np.ndarray  # (maps,): positions at no head dim
    _dim_units: list[np.ndarray]  # per map: the head-dim unit of each position (-1: none)
    _dims_only: np.ndarray  # (maps,): the map counts its kept head dims only
    _unit_atoms: list[np.ndarray]  # the atoms of each head-dim unit
    _coef: np.ndarray  # (terms,)
    _first: np.ndarray  # (terms,): map index or -1 (factor 1)
    _second: np.ndarray
    _constant: float  # the part of ``total`` no map touches

    def __post_init__(self) -> None:
        #: positions per map (at least 1), counted once: ``cost`` runs in the allocators' loops
        self._lengths = np.maximum([len(labels) for labels in self._labels], 1).astype(np.float64)

    def cost(self, keep: np.ndarray) -> np.ndarray:
        """Cost for kept counts ``keep`` of shape (groups,) or (batch, groups)."""
        keep = np.asarray(keep, dtype=np.float64)
        kept = keep @ self._share.T + self._fixed  # (..., maps)
        dims = (keep @ self._dim_share.T + self._dim_fixed) / self._lengths  # a dims-only map: all
        return self._combine(kept * dims)  # its positions in ``kept``, so its dims' share

    def exact(self, removed_atoms: np.ndarray) -> int:
        """Cost of a concrete plan (``Analysis.removed_atoms`` mask), counting positions; a
        head-dim unit is gone when all its atoms are."""
        unit_gone = np.array([bool(removed_atoms[atoms].all()) for atoms in self._unit_atoms]
                             + [False])  # last slot: no unit
        kept = np.array([np.count_nonzero(~unit_gone[units]) if only else
                         np.count_nonzero(~removed_atoms[labels]) for labels, units, only in
                         zip(self._labels, self._dim_units, self._dims_only)], dtype=np.float64)
        return round(float(self._combine(kept)))

    def ratio(self, keep: np.ndarray) -> np.ndarray:
        return self.cost(keep) / self.total if self.total else np.ones(np.shape(keep)[:-1])

    def _combine(self, kept: np.ndarray) -> np.ndarray:
        r = kept / self._lengths
        ones = np.ones((*r.shape[:-1], 1))
        r = np.concatenate([r, ones], axis=-1)  # index -1: factor 1
        return (self._coef * r[..., self._first] * r[..., self._second]).sum(-1) + self._constant


class _Builder:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.index: dict[tuple[int, bool], int] = {}
        self.labels: list[np.ndarray] = []
        self.dims_only: list[bool] = []
        self.terms: list[tuple[float, int, int]] = []

    def map_index(self, cmap: ChannelMap | _DimsOnly | None) -> int:
        if cmap is None:
            return -1
        only = isinstance(cmap, _DimsOnly)
        labels = cmap.cmap.labels if only else cmap.labels
        key = (id(labels), only)
        if key not in self.index:
            self.index[key] = len(self.labels)
            self.labels.append(labels)
            self.dims_only.append(only)
        return self.index[key]

    def add(self, coef: float, a: ChannelMap | _DimsOnly | None,
            b: ChannelMap | _DimsOnly | None = None,
            square: bool = False) -> None:
        """A term ``coef * kept(a) * kept(b)``; the same map twice counts once (depthwise: one
        axis) unless ``square`` (a recurrence ``R``: hidden units on both axes)."""
        ia, ib = self.map_index(a), self.map_index(b)
        if ia == ib and ia >= 0 and not square:
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
            key = first_output(t.name for t in node.outputs)
            if key not in per_node:
                continue
            if node.op in RECURRENT_OPS:
                _recurrent_macs(builder, node, per_node[key], analysis)
            else:
                out, contracted = _mac_maps(node, analysis)
                builder.add(per_node[key], out, contracted)
    else:
        total = count_params(original)  # the constants inside bodies count too
        seen: set[str] = set()
        for node in (n for part in with_bodies(graph) for n in part.nodes):
            for index, tensor in enumerate(node.inputs):
                size, key = _stored_size(tensor, integer=node.op in _INTEGER_WEIGHTS)
                if key is None or key in seen:
                    continue
                if node.op == "MatMulNBits" and index == 1:  # codes, as count_params counts
                    size = (size[0] * (8 // int(node.attrs.get("bits", 4))), size[1])
                axes = _dequantized_maps(node, index, size[1], analysis) \
                    if node.op == "DequantizeLinear" else \
                    _param_maps(node, index, size[1], analysis)
                if axes is not None:  # else a later consumer may slice it (or none: fixed)
                    seen.add(key)
                    builder.add(size[0], *axes)
    return _finish(builder, analysis, metric, total)


def _finish(builder: _Builder, analysis: Analysis, metric: Metric, total: int) -> CostModel:
    n_groups, n_maps = len(analysis.groups), len(builder.labels)
    group_of_class = analysis.group_of_class
    share, dim_share = np.zeros((n_maps, n_groups)), np.zeros((n_maps, n_groups))
    fixed, dim_fixed = np.zeros(n_maps), np.zeros(n_maps)
    dim_class = analysis.dim_class_of_atom
    first = analysis.n_base_classes
    dim_units = []
    for m, (labels, only) in enumerate(zip(builder.labels, builder.dims_only)):
        owned = labels >= 0
        units = np.full(len(labels), -1, dtype=np.int64)
        if dim_class is not None:
            units[owned] = dim_class[labels[owned]]
        at_dim = units >= 0
        dim_fixed[m] = np.count_nonzero(~at_dim)
        np.add.at(dim_share[m], group_of_class[units[at_dim]], 1.0)
        units[at_dim] -= first
        dim_units.append(units)
        if only:  # its heads' share is counted by the map of the output
            fixed[m] = len(labels)
            continue
        fixed[m] = np.count_nonzero(~owned)
        groups = group_of_class[analysis.class_of_atom[labels[owned]]]
        np.add.at(share[m], groups, 1.0)
    n_channels = np.array([g.n_channels for g in analysis.groups], dtype=np.int64)
    share /= np.maximum(n_channels, 1)
    dim_share /= np.maximum(n_channels, 1)
    coef = np.array([t[0] for t in builder.terms], dtype=np.float64)
    modelled = float(coef.sum())
    return CostModel(metric, int(total), n_channels, builder.labels, share, fixed, dim_share,
                     dim_fixed, dim_units, np.array(builder.dims_only, dtype=bool),
                     list(analysis.dim_atoms), coef,
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


@dataclass
class _DimsOnly:
    """A split tensor's map read for its kept head dims only (a contraction over them)."""

    cmap: ChannelMap


def _contracted_dims(analysis: Analysis, tensor: gs.Tensor | None, axis: int) -> _DimsOnly | None:
    """The head dims of a split ``tensor`` when its axis ``axis`` (from the end) is a head's
    dim level (``q @ k^T`` over ``head_dim``), else None."""
    smap = analysis.split_maps.get(tensor.name) if tensor is not None and tensor.name else None
    rank = analysis.ranks.get(tensor.name) if smap is not None else None
    if rank is None:
        return None
    position = smap.position(axis + rank)
    if position is None or smap.levels[position] == analysis.split_free[smap.record]:
        return None
    return _DimsOnly(ChannelMap(smap.axes[0], smap.labels.reshape(-1)))


def _split_as_map(analysis: Analysis, name: str) -> ChannelMap | None:
    """A tensor whose channels are split over several axes (attention heads) as one flat map:
    the kept share of its positions is the kept share of its elements, which is what scales a
    MAC op's output (the scores and context of the heads kept)."""
    smap = analysis.split_maps.get(name)
    return None if smap is None else ChannelMap(smap.axes[0], smap.labels.reshape(-1))


def _attr(node: gs.Node, name: str, default: int = 0) -> int:
    return int(node.attrs.get(name, default))


def _mac_maps(node: gs.Node, analysis: Analysis) -> tuple[ChannelMap | None, object]:
    """(map scaling the output's size, map scaling the contracted length) of a MAC op."""
    kind, w_index = MAC_OPS[node.op]
    x = node.inputs[0] if node.inputs else None
    w = node.inputs[w_index] if len(node.inputs) > w_index else None
    out = _map(analysis, node.outputs[0])
    if kind == "attention":  # projection, scores and context all scale with the kept heads
        return out, None
    if kind == "conv":
        return out, _map(analysis, x, 1)  # depthwise: the same map twice, counted once
    if kind == "convtranspose":  # MACs = |input| * |W[1:]|; W[1] = output channels / group
        return _map(analysis, x, 1), out
    if kind == "gemm":
        contracted = _map(analysis, x, 0 if _attr(node, "transA") else 1) or \
            _map(analysis, w, 1 if _attr(node, "transB") else 0)
        return out, contracted
    return out, _map(analysis, x, -1) or _map(analysis, w, -2) or \
        _contracted_dims(analysis, x, -1) or _contracted_dims(analysis, w, -2)  # MatMul


def _recurrent_macs(builder: _Builder, node: gs.Node, macs: int, analysis: Analysis) -> None:
    """A recurrent layer's MACs, (seq * batch) * (|W| + |R|): the W part scales with its hidden
    units and input features, the R part with its hidden units on both axes."""
    hidden = hidden_output_map(node.outputs, analysis.maps)
    features = _map(analysis, node.inputs[0], FEATURE_AXIS)
    shapes = [node.inputs[i].shape for i in (recurrent.W, recurrent.R)]
    if any(shape is None or any(not isinstance(d, int) for d in shape) for shape in shapes):
        builder.add(macs, hidden, features)  # weights of unknown size: split unknown
        return
    sizes = [int(np.prod(shape)) for shape in shapes]
    builder.add(macs * sizes[0] / sum(sizes), hidden, features)
    if hidden is not None:
        builder.add(macs * sizes[1] / sum(sizes), hidden, hidden, square=True)


def _dequantized_maps(node: gs.Node, index: int, shape: tuple[int, ...], analysis: Analysis
                      ) -> tuple[ChannelMap | None, ChannelMap | None] | None:
    """A QDQ weight (or bias) is sliced as the input of the layer its ``DequantizeLinear``
    feeds; a per-channel scale or zero point as that layer's per-output values when it runs
    along the weight's output-channel axis."""
    consumers = node.outputs[0].outputs
    if len(consumers) != 1:
        return None
    layer = consumers[0]
    at = next(i for i, t in enumerate(layer.inputs) if t is node.outputs[0])
    if index == 0:
        return _param_maps(layer, at, shape, analysis)
    kind, w_index = MAC_OPS.get(layer.op, (None, 0))
    rank = len(node.outputs[0].shape or ()) or analysis.ranks.get(node.outputs[0].name)
    out = _map(analysis, layer.outputs[0])
    if kind is None or out is None or len(shape) != 1 or shape[0] != len(out.labels) or \
            shape[0] <= 1 or not rank:
        return None
    if at in _PER_OUTPUT.get(layer.op, ()):  # a bias's scale: one per output channel
        return out, None
    axis = int(node.attrs.get("axis", 1)) % rank
    out_axis = {"conv": 0, "convtranspose": 1, "matmul": rank - 1}.get(
        kind, 0 if _attr(layer, "transB") else 1)
    return (out, None) if at == w_index and axis == out_axis else None


def _stored_size(tensor: gs.Tensor | None, integer: bool = False
                 ) -> tuple[tuple[int, tuple[int, ...]], str | None]:
    """(elements, shape) of a stored float constant behind ``tensor`` and its root's name;
    with ``integer``, integer constants too (quantized weights and biases)."""
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
    if dtype.kind != "f" and not dtype.name.startswith(("bfloat", "float")) and not (
            integer and dtype.kind in "iu"):
        return (0, ()), None  # shape parameters and indices: their element counts stay
    return (int(np.prod(shape, dtype=np.int64)), shape), key


def _param_maps(node: gs.Node, index: int, shape: tuple[int, ...], analysis: Analysis
                ) -> tuple | None:
    """Maps along which the constant at ``node.inputs[index]`` is sliced (None: not at all),
    and for a recurrence whether the one map counts on both axes."""
    x = node.inputs[0]
    out = _map(analysis, node.outputs[0]) if node.outputs else None
    kind, w_index = MAC_OPS.get(node.op, (None, 0))
    per_output = index in _PER_OUTPUT.get(node.op, ())
    if kind in ("conv", "convtranspose") and (index == w_index or per_output):
        if per_output:  # one value per output channel (axis 1 of the output)
            return (out, None) if out is not None and len(shape) == 1 and \
                shape[0] == len(out.labels) else None
        xin = _map(analysis, x, 1)
        return (out, xin) if kind == "conv" else (xin, out)
    if kind == "gemm" and (index == w_index or per_output):
        if per_output:
            return _aligned(out, node.outputs[0], shape, analysis), None
        return out, _map(analysis, x, 0 if _attr(node, "transA") else 1)
    if node.op == "MatMulNBits" and index in (2, 3):  # scales, zero points: (N, k_blocks)
        return out, _map(analysis, x, -1)
    if kind == "matmul" and (index == w_index or per_output):
        if per_output:
            return _aligned(out, node.outputs[0], shape, analysis), None
        return out, _map(analysis, x, -1)
    if kind == "attention":
        return _attention_param_maps(node, index, shape, out, analysis)
    if node.op in _NORM_1D and len(shape) == 1 and index > 0:
        return _map(analysis, x, 1), None
    if node.op in RECURRENT_OPS:  # W: hidden rows, input columns; R: hidden both ways
        hidden = hidden_output_map(node.outputs, analysis.maps)
        if index == recurrent.W:
            return hidden, _map(analysis, x, FEATURE_AXIS)
        if index == recurrent.R:
            return (hidden, hidden, True) if hidden is not None else None
        return (hidden, None) if index in recurrent.SLICED_WITH_UNITS and hidden is not None \
            else None
    for tensor in [*node.inputs, *node.outputs]:
        if tensor is None or tensor is node.inputs[index]:
            continue
        found = _aligned(_map(analysis, tensor), tensor, shape, analysis)
        if found is not None:
            return found, None
    return None


#: Fused attention: inputs sliced by whole heads (packed QKV weight and bias, MultiHeadAttention's
#: packed bias) and the input of a constant per-head attention bias (B, h, S, T).
_ATTENTION_BY_HEADS = {("com.microsoft", "Attention"): (1, 2),
                       ("com.microsoft", "MultiHeadAttention"): (3,)}
_ATTENTION_BIAS = {("com.microsoft", "Attention"): 5, ("com.microsoft", "MultiHeadAttention"): 5,
                   ("", "Attention"): 3}


def _attention_param_maps(node: gs.Node, index: int, shape: tuple[int, ...],
                          out: ChannelMap | None, analysis: Analysis) -> tuple | None:
    """A fused attention op's constants that its handler slices by whole heads scale with the
    kept share of its output (the heads kept); the rest (rotary caches) stay."""
    if out is None:
        return None
    key = (node.domain or "", node.op)
    if index in _ATTENTION_BY_HEADS.get(key, ()):
        return out, None
    split = analysis.split_maps.get(node.outputs[0].name)
    heads = _attr(node, "num_heads") or _attr(node, "q_num_heads") or (
        split.labels.shape[0] if split is not None else 0)
    if index == _ATTENTION_BIAS.get(key) and len(shape) == 4 and shape[1] == heads > 1:
        return out, None
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

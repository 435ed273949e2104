"""Interface changes under ``--allow-interface-change``: KV caches that shrink with their heads.

A decoder exported with a KV cache reads ``past_key_values.*`` graph inputs and writes
``present.* = Concat(past, new)`` on the sequence axis. By default its KV heads stay whole (they
reach a graph output); with the flag, a *cache input* (a float graph input joined by a Concat
into a graph output) holds the channels of the new keys/values it is joined with, and that
output may lose them: both shrink along the head axis, and along head_dim where head dims go
within the kept heads (``head_dims``). A fused attention op that reads the past and writes the
present itself (``FUSED_CACHES``: onnxruntime-genai's GroupQueryAttention) gives both the
channels of its KV heads when no other op reads them on those axes (``read_only_by``). Nothing
else of the interface changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import PruneConfig
from ..errors import ConfigError
from .blocks import split_keeps
from .channels import Analysis
from .op_families import CACHE_ATTENTION


#: Fused attention ops whose past inputs and present outputs are KV caches that may shrink with
#: their KV heads: (op, domain) -> (past input indices, present output indices, (head axis,
#: head_dim axis) of every one of them), the indices as ``CACHE_ATTENTION`` lists them.
FUSED_CACHES = {op: (tuple(past for past, _ in CACHE_ATTENTION[op]),
                     tuple(present for _, present in CACHE_ATTENTION[op]), (1, 3))
                for op in (("GroupQueryAttention", "com.microsoft"),)}


def cache_inputs(graph: gs.Graph) -> frozenset[str]:
    """Float graph inputs that a Concat joins into a graph output, or that a fused attention op
    reads as its past (``FUSED_CACHES``): a past key/value cache."""
    outputs = {t.name for t in graph.outputs}
    found = set()
    for tensor in graph.inputs:
        if tensor.dtype is not None and np.dtype(tensor.dtype).kind != "f":
            continue
        if any(n.op == "Concat" and n.outputs[0].name in outputs for n in tensor.outputs):
            found.add(tensor.name)
        for node in tensor.outputs:
            pasts = FUSED_CACHES.get((node.op, node.domain or ""), ((),))[0]
            if any(i < len(node.inputs) and node.inputs[i] is tensor for i in pasts):
                found.add(tensor.name)
    return frozenset(found)


def read_only_by(node: gs.Node, tensor: gs.Tensor, axes: tuple[int, ...], ctx=None) -> bool:
    """True when every reader of ``tensor`` but ``node`` is a Shape of axes other than ``axes``
    (so those axes may shrink without another op seeing it); with ``ctx``, a Shape whose
    readers only pick other axes (``_picked``) counts as one of those."""
    rank = len(tensor.shape) if tensor.shape is not None else None
    for reader in tensor.outputs:
        if reader is node:
            continue
        if reader.op != "Shape" or rank is None:
            return False
        start = int(reader.attrs.get("start", 0))
        end = int(reader.attrs.get("end", rank))
        read = range(*slice(start, end).indices(rank))
        if any(a in (read if ctx is None else _picked(reader, read, ctx)) for a in axes):
            return False
    return True


def joins_cache(node: gs.Node, tensor: gs.Tensor, axes: tuple[int, ...], ctx) -> bool:
    """True when ``tensor`` (joined by ``node``) is a cache input whose ``axes`` may shrink:
    ``node`` writes a graph output and the input's other readers are Shapes of other axes
    (or Shapes whose readers only pick other axes)."""
    if tensor.name not in ctx.cache_inputs or \
            node.outputs[0].name not in {t.name for t in ctx.graph.outputs}:
        return False
    return read_only_by(node, tensor, axes, ctx)


def _picked(shape: gs.Node, read: range, ctx) -> set[int]:
    """The axes of ``read`` that Shape ``shape``'s readers pick: all of them, unless every
    reader is a Gather of constant indices (optimum's past length: ``Shape(past)[2]``)."""
    picked = set()
    for reader in shape.outputs[0].outputs:
        index = ctx.const(reader.inputs[1]) if reader.op == "Gather" and \
            int(reader.attrs.get("axis", 0)) == 0 and len(reader.inputs) > 1 else None
        if index is None:
            return set(read)
        picked |= {read[int(i)] for i in np.asarray(index).reshape(-1) if -len(read) <= i <
                   len(read)}
    return picked


@dataclass(frozen=True)
class InterfaceChange:
    """A graph input or output whose axes keep only ``kept[axis]`` (indices into ``before``):
    its heads axis (KV groups) and, within the kept heads, its head_dim axis (head dims)."""

    name: str
    is_input: bool
    kept: dict[int, np.ndarray]
    before: tuple[int | str | None, ...]
    heads_axis: int | None = None
    head_dim_axis: int | None = None

    @property
    def axes(self) -> tuple[int, ...]:
        return tuple(sorted(self.kept))

    @property
    def after(self) -> tuple[int | str | None, ...]:
        dims = list(self.before)
        for axis, kept in self.kept.items():
            dims[axis] = len(kept)
        return tuple(dims)

    def restrict(self, value: np.ndarray) -> np.ndarray:
        """``value`` (a tensor as the original reads or writes it) on the kept entries."""
        for axis in self.axes:
            value = np.take(value, self.kept[axis], axis=axis)
        return value

    def to_dict(self) -> dict:
        """The report row; ``axis`` is the heads axis where the heads change (else the first
        axis that does), kept for readers of one axis (``genai_config``)."""
        axis = self.heads_axis if self.heads_axis in self.kept else self.axes[0]
        return {"name": self.name, "kind": "input" if self.is_input else "output",
                "axis": axis, "axes": list(self.axes), "heads_axis": self.heads_axis,
                "head_dim_axis": self.head_dim_axis, "before": list(self.before),
                "after": list(self.after)}


def interface_changes(analysis: Analysis, removed_classes: np.ndarray,
                      model: onnx.ModelProto) -> list[InterfaceChange]:
    """The graph inputs/outputs of ``model`` that lose channels under the plan (only cache
    inputs/outputs carry channels there: every other graph output blocks them): whole heads,
    and head dims within the kept heads (``head_dims``)."""
    if not any(v.name in analysis.split_maps for v in (*model.graph.input, *model.graph.output)):
        return []
    removed = analysis.removed_atoms(removed_classes)
    changes = []
    for is_input, values in ((True, model.graph.input), (False, model.graph.output)):
        for value in values:
            smap = analysis.split_maps.get(value.name)
            if smap is None:
                continue
            found = split_keeps(removed, smap)
            if not found:
                continue
            free = analysis.split_free[smap.record]
            heads = smap.axes[smap.levels.index(free)] if free in smap.levels else None
            dims_axis = next((smap.axes[p] for p, _ in found if smap.axes[p] != heads), None)
            dims = tuple(d.dim_value if d.HasField("dim_value") else
                         (d.dim_param or None) for d in value.type.tensor_type.shape.dim)
            changes.append(InterfaceChange(value.name, is_input,
                                           {smap.axes[p]: kept for p, kept in found}, dims,
                                           heads, dims_axis))
    return changes


def resized(changes: list[InterfaceChange]) -> dict[str, dict[int, int]]:
    """name -> {axis: new size}, as the export declares them."""
    return {c.name: {axis: len(kept) for axis, kept in c.kept.items()} for c in changes}


def resized_shapes(shapes: dict[str, tuple[int, ...]], changes: list[InterfaceChange]
                   ) -> dict[str, tuple[int, ...]]:
    """Input sizes chosen for the original with each shrunk input at its new size: what the
    pruned model runs at (its MACs are counted there)."""
    out = dict(shapes)
    for change in changes:
        if change.is_input and change.name in out:
            dims = list(out[change.name])
            for axis, kept in change.kept.items():
                dims[axis] = len(kept)
            out[change.name] = tuple(dims)
    return out


def refuse_data_options(changes: list[InterfaceChange], config: PruneConfig) -> None:
    """Calibration/evaluation data (fidelity, compensation, recovery) feed the pruned model the
    original's inputs: not with caches that shrank (not built yet).

    Raises:
        ConfigError: ``changes`` and such an option.
    """
    used = [flag for flag, on in (("--calibration", config.calibration),
                                  ("--eval", config.evaluation),
                                  ("--compensate", config.compensate != "none"),
                                  ("--recover", config.recover != "none")) if on]
    if changes and used:
        raise ConfigError(f"{', '.join(used)} with --allow-interface-change: the KV caches "
                          f"shrank ({changes[0].name} and {len(changes) - 1} more), and the "
                          "data paths feed the original's inputs; not supported together yet")

"""Interface changes under ``--allow-interface-change``: KV caches that shrink with their heads.

A decoder exported with a KV cache reads ``past_key_values.*`` graph inputs and writes
``present.* = Concat(past, new)`` on the sequence axis. By default its KV heads stay whole (they
reach a graph output); with the flag, a *cache input* (a float graph input joined by a Concat
into a graph output) holds the channels of the new keys/values it is joined with, and that
output may lose them: both shrink along the head axis. A fused attention op that reads the past
and writes the present itself (``FUSED_CACHES``: onnxruntime-genai's GroupQueryAttention) gives
both the channels of its KV heads when no other op reads them on those axes
(``read_only_by``). Nothing else of the interface changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import PruneConfig
from ..errors import ConfigError
from .blocks import split_keep
from .channels import Analysis


#: Fused attention ops whose past inputs and present outputs are KV caches that may shrink with
#: their KV heads: (op, domain) -> (past input indices, present output indices, (head axis,
#: head_dim axis) of every one of them, (batch, kv heads, sequence, head_dim)).
FUSED_CACHES = {("GroupQueryAttention", "com.microsoft"): ((3, 4), (1, 2), (1, 3))}


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


def read_only_by(node: gs.Node, tensor: gs.Tensor, axes: tuple[int, ...]) -> bool:
    """True when every reader of ``tensor`` but ``node`` is a Shape of axes other than ``axes``
    (so those axes may shrink without another op seeing it)."""
    rank = len(tensor.shape) if tensor.shape is not None else None
    for reader in tensor.outputs:
        if reader is node:
            continue
        if reader.op != "Shape" or rank is None:
            return False
        start = int(reader.attrs.get("start", 0))
        end = int(reader.attrs.get("end", rank))
        if any(a in range(*slice(start, end).indices(rank)) for a in axes):
            return False
    return True


def joins_cache(node: gs.Node, tensor: gs.Tensor, axes: tuple[int, ...], ctx) -> bool:
    """True when ``tensor`` (joined by ``node``) is a cache input whose ``axes`` may shrink:
    ``node`` writes a graph output and the input's other readers are Shapes of other axes."""
    if tensor.name not in ctx.cache_inputs or \
            node.outputs[0].name not in {t.name for t in ctx.graph.outputs}:
        return False
    return read_only_by(node, tensor, axes)


@dataclass(frozen=True)
class InterfaceChange:
    """A graph input or output whose ``axis`` keeps only ``kept`` (indices into ``before``)."""

    name: str
    is_input: bool
    axis: int
    kept: np.ndarray
    before: tuple[int | str | None, ...]

    @property
    def after(self) -> tuple[int | str | None, ...]:
        dims = list(self.before)
        dims[self.axis] = len(self.kept)
        return tuple(dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": "input" if self.is_input else "output",
                "axis": self.axis, "before": list(self.before), "after": list(self.after)}


def interface_changes(analysis: Analysis, removed_classes: np.ndarray,
                      model: onnx.ModelProto) -> list[InterfaceChange]:
    """The graph inputs/outputs of ``model`` that lose channels under the plan (only cache
    inputs/outputs carry channels there: every other graph output blocks them)."""
    if not any(v.name in analysis.split_maps for v in (*model.graph.input, *model.graph.output)):
        return []
    removed = analysis.removed_atoms(removed_classes)
    changes = []
    for is_input, values in ((True, model.graph.input), (False, model.graph.output)):
        for value in values:
            smap = analysis.split_maps.get(value.name)
            if smap is None:
                continue
            found = split_keep(removed, smap, analysis.split_free[smap.record])
            if found is not None:
                dims = tuple(d.dim_value if d.HasField("dim_value") else
                             (d.dim_param or None) for d in value.type.tensor_type.shape.dim)
                changes.append(InterfaceChange(value.name, is_input, smap.axes[found[0]],
                                               found[1], dims))
    return changes


def resized(changes: list[InterfaceChange]) -> dict[str, tuple[int, int]]:
    """name -> (axis, new size), as the export declares them."""
    return {c.name: (c.axis, len(c.kept)) for c in changes}


def resized_shapes(shapes: dict[str, tuple[int, ...]], changes: list[InterfaceChange]
                   ) -> dict[str, tuple[int, ...]]:
    """Input sizes chosen for the original with each shrunk input at its new size: what the
    pruned model runs at (its MACs are counted there)."""
    out = dict(shapes)
    for change in changes:
        if change.is_input and change.name in out:
            dims = list(out[change.name])
            dims[change.axis] = len(change.kept)
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

"""A softmax scale computed from a Shape of q/k, replaced by the original's constant value.

Exporters of ``scaled_dot_product_attention`` (optimum's BERT, ``nn.MultiheadAttention`` under
TorchScript) compute ``1/sqrt(head_dim)`` at run time: ``Shape(q) -> Slice/Gather -> Cast ->
Sqrt -> Div(1, .) -> [Sqrt] -> Mul(q, .)``. Pruning head dims would change that value, so such a
Shape used to keep q/k's head_dim whole. The value is a constant of the original model when
every size it reads is static (head_dim, not the batch or the sequence): then the rewrite feeds
its readers that constant instead (the chain is left unused and removed) and the dims prune;
the pruned model equals the masked original, which computes the same value from its own,
unpruned shape.

What counts as such a scale: the nodes reachable from the Shape's output whose other inputs are
constants, all of them foldable ops; the values leaving them (read by a node outside) are small
float tensors. Two evaluations, with the unread symbolic sizes at 1 and at 7, must agree. A
scale that reads a symbolic size stays computed, and the dims it reads stay whole with a reason.
Anything else (a Reshape target, a mask size) is not a scale and is left to the other rules.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .constants import FOLDABLE_OPS, ConstantFolder
from .shape_values import symbolic_dims

#: At most this many nodes between the Shape and the values it gives.
MAX_CHAIN = 24
#: At most this many elements in each value that leaves the chain (a scale, per head at most).
MAX_ELEMENTS = 64
#: Sizes tried for the symbolic dims the Shape does not read: the value must not depend on them.
_PROBE_SIZES = (1, 7)


def _chain(node: gs.Node, const) -> tuple[list[gs.Node], list[gs.Tensor]] | None:
    """(the nodes computing from ``node``'s output and constants, the tensors leaving them);
    None when one of them is not foldable or the chain is too long."""
    inside = {node.outputs[0].name}
    nodes: list[gs.Node] = []
    leaving: dict[str, gs.Tensor] = {}
    frontier = [node.outputs[0]]
    while frontier:
        tensor = frontier.pop()
        for reader in tensor.outputs:
            if any(reader is n for n in nodes):
                continue
            others = [t for i, t in enumerate(reader.inputs) if t is not None and t.name and
                      t.name not in inside and not (reader.op == "CastLike" and i == 1)]
            foldable = reader.op in FOLDABLE_OPS and (reader.domain or "") in ("", "ai.onnx")
            if not foldable or any(const(t) is None for t in others):
                leaving[tensor.name] = tensor
                continue
            nodes.append(reader)
            if len(nodes) > MAX_CHAIN:
                return None
            for out in reader.outputs:
                inside.add(out.name)
                frontier.append(out)
    # a tensor read both inside and outside leaves too
    for n in nodes:
        for out in n.outputs:
            if any(not any(r is m for m in nodes) for r in out.outputs):
                leaving[out.name] = out
    return nodes, list(leaving.values())


def _evaluate(node: gs.Node, leaving: list[gs.Tensor], dims: list, opset: int,
              size: int) -> list[np.ndarray] | None:
    folder = ConstantFolder(opset)
    shape = np.array([d if isinstance(d, int) else size for d in dims], dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    folder.assume(node.outputs[0].name, shape[start:end])
    values = [folder.value(t) for t in leaving]
    return None if any(v is None for v in values) else values


def computed_scale(node: gs.Node, read: set[int], opset: int, const
                   ) -> list[tuple[str, np.ndarray]] | str | None:
    """For a Shape reading a split tensor's sizes at axes ``read``: the values that leave its
    chain, by tensor name, when they form a scale that is a constant of the original; a reason
    when they form a scale that reads a symbolic size; None when they are no scale."""
    found = _chain(node, const)
    dims = symbolic_dims(node.inputs[0])
    if found is None or dims is None or not found[1]:
        return None
    nodes, leaving = found
    first = _evaluate(node, leaving, dims, opset, _PROBE_SIZES[0])
    if first is None or any(np.asarray(v).dtype.kind != "f" or np.size(v) > MAX_ELEMENTS
                            for v in first):
        return None
    symbolic = sorted({str(dims[a]) for a in read if not isinstance(dims[a], int)})
    second = _evaluate(node, leaving, dims, opset, _PROBE_SIZES[1])
    if symbolic or second is None or not all(np.array_equal(a, b)
                                             for a, b in zip(first, second)):
        what = ", ".join(symbolic) or "a symbolic size"
        return (f"the softmax scale computed from Shape {node.name} reads {what}: not a "
                "constant of the model")
    return [(t.name, np.asarray(v)) for t, v in zip(leaving, first)]


def freeze_scale(node: gs.Node, values: list[tuple[str, np.ndarray]]) -> None:
    """Feed the readers of each value its original constant (``computed_scale``); the chain
    from ``node`` is then unused and the rewrite's cleanup removes it."""
    tensors: dict[str, gs.Tensor] = {}
    frontier = [node.outputs[0]]
    while frontier and len(tensors) <= 4 * MAX_CHAIN:  # the chain's tensors, by name
        tensor = frontier.pop()
        if tensor.name in tensors:
            continue
        tensors[tensor.name] = tensor
        frontier.extend(out for reader in tensor.outputs if reader.op in FOLDABLE_OPS
                        for out in reader.outputs)
    for name, value in values:
        tensor = tensors.get(name)
        if tensor is None:
            continue
        constant = gs.Constant(f"{name}__original_scale", value)
        for reader in list(tensor.outputs):
            reader.inputs = [constant if t is tensor else t for t in reader.inputs]

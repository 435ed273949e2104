"""Unnamed dims traced back through the ops that carry them unchanged.

A dim shape inference could not name (a batch times a patch count in MobileViT, Swin's windows
times the batch) is a token of its own per tensor, so ``Shape(x)[0]`` of a LayerNorm's output
and dim 0 of the query projection after it looked unequal, and the ``view(b, n, heads, d)``
target of attention could not be resolved. Here such a dim takes the token of the dim it is a
copy of: through elementwise ops (where every other operand broadcasts on that axis: absent or a
static 1), MatMul's leading axes (a weight of rank <= 2 on the right), and Transpose. The
equality is structural, true at every input size, never a coincidence of the chosen sizes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..model.runtime import ANONYMOUS
from .op_families import UNARY_OPS, VALUE_PRESERVING

#: ops whose output has input 0's shape (axis for axis): the elementwise handlers' unary ops
#: and the normalizations
_SAME_SHAPE = frozenset({*UNARY_OPS, *VALUE_PRESERVING, "LayerNormalization",
                         "SimplifiedLayerNormalization", "Softmax", "LogSoftmax",
                         "InstanceNormalization", "BatchNormalization"})
#: broadcasting ops: the output axis is an input's where every other input broadcasts on it
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum"})
_MAX_DEPTH = 512  # long residual streams; past that the dim keeps a token of its own


def dim_token(tensor: gs.Tensor, axis: int) -> int | str:
    """``tensor``'s unnamed dim ``axis`` as the dim it copies: a size or symbol found up the
    graph, else the token ``?name#axis`` of the first tensor whose dim it copies."""
    for _ in range(_MAX_DEPTH):
        found = _copied_from(tensor, axis)
        if found is None:
            break
        tensor, axis = found
        dim = tensor.shape[axis]
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            return int(dim)
        if isinstance(dim, str) and dim.strip() not in ANONYMOUS:
            return dim
    return f"?{tensor.name}#{axis}"


def _copied_from(tensor: gs.Tensor, axis: int) -> tuple[gs.Tensor, int] | None:
    """(input, axis) whose dim ``tensor``'s dim ``axis`` equals by the producer's definition."""
    if len(tensor.inputs) != 1 or tensor.shape is None:
        return None
    node = tensor.inputs[0]
    rank = len(tensor.shape)
    inputs = [t for t in node.inputs if t is not None and t.name]
    if not inputs or node.outputs[0] is not tensor:
        return None
    if node.op in _SAME_SHAPE:
        return _same_rank(inputs[0], axis, rank)
    if node.op in _BROADCASTING:
        return _broadcast_source(inputs, axis, rank)
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return _same_rank(inputs[0], int(perm[axis]), rank) if perm is not None else None
    if node.op == "MatMul" and len(inputs) == 2 and rank >= 3 and axis < rank - 1:
        weight = inputs[1].shape
        if weight is not None and len(weight) <= 2:
            return _same_rank(inputs[0], axis, rank)
    return None


def _same_rank(tensor: gs.Tensor, axis: int, rank: int) -> tuple[gs.Tensor, int] | None:
    if tensor.shape is None or len(tensor.shape) != rank:
        return None
    return tensor, axis


def _broadcast_source(inputs: list[gs.Tensor], axis: int, rank: int):
    """The one input that sets the output's size on ``axis`` (the others are absent there or a
    static 1); None when two may (an unknown dim might be a 1 that broadcasts)."""
    if any(t.shape is None for t in inputs):
        return None
    setting = [t for t in inputs if axis - (rank - len(t.shape)) >= 0 and
               t.shape[axis - (rank - len(t.shape))] != 1]
    if len(setting) != 1 or len(setting[0].shape) != rank:
        return None
    return setting[0], axis

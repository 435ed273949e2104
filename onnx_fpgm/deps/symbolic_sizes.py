"""Sizes read back by ``Shape`` that follow the plan at run time (TorchScript's cache export).

TorchScript writes ``repeat_kv`` of a KV cache from sizes it reads off the cache itself:
``Expand(Unsqueeze(k), Where(Equal(s, -1), 1, s))`` with ``s = [b, Shape(k)[1], n_rep, t,
Shape(k)[3]]``, then ``Reshape`` to ``[b, Shape(k)[1] * n_rep, t, Shape(k)[3]]``. When a level
of ``k`` shrinks (KV groups under ``--allow-interface-change``, head dims), these sizes shrink
with it at run time, so the shapes they build stay right without a rewrite, provided that

* every value the Shape reads only reaches the shape input of a Reshape or Expand, through ops
  that move elements (Gather/Slice/Concat/Unsqueeze/Squeeze/Cast/Identity, a Reshape or Flatten
  of the vector), scale them by a positive constant (``Mul``: ``n_rep``), or pick them in
  ``Where(Equal(s, negative), x, s)`` (a size is never negative: the pick is decided), or only
  have their count read (``Shape`` of the vector): :func:`reads_follow`; a size divided by a
  constant may only bound a Slice of the tensor it was read from (rotate_half's
  ``x[..., : d // 2]``: head dims keep rotary's pairs, so the middle stays the middle);
* where they land, the size at run time is the count the plan keeps on that axis: the
  handlers accept such an element (:func:`follows`) and the rewrite checks the count exactly
  (:func:`runtime_count`), raising where it would not hold.

Anything else (arithmetic, a size compared or sent elsewhere) is refused with a reason: the
level it reads then stays whole.
"""
from __future__ import annotations

import numpy as np

from .shape_values import ELEMENT_MOVING_OPS, Element, tensor_elements

#: Ops that move the elements of a shape vector (their data input is input 0, Concat's all):
#: shape_values' moving ops but those this module judges apart (Mul, Where) or that make a
#: new vector (Shape, ConstantOfShape).
_MOVING = ELEMENT_MOVING_OPS - {"Shape", "Mul", "Where", "ConstantOfShape"}


def reads_follow(node, ctx) -> str | None:
    """None when every size Shape ``node`` reads only builds Reshape/Expand shapes (see the
    module docstring), else why not."""
    pending, seen = [(t, False) for t in node.outputs], set()
    outputs = {t.name for t in ctx.graph.outputs}
    while pending:
        tensor, halved = pending.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs or not tensor.outputs:
            return f"the size read by Shape {node.name} reaches a graph output"
        for reader in tensor.outputs:
            if _bound_of(reader, tensor, node.inputs[0]):
                continue  # rotate_half's x[..., : d // 2] on the tensor read
            if halved and reader.op not in _MOVING:
                return f"{reader.op} {reader.name} computes on a size read by Shape and divided"
            why = _divided(reader, tensor, ctx) if reader.op == "Div" else \
                _step(reader, tensor, ctx)
            if why is not None:
                return why
            endpoint = reader.op in ("Reshape", "Expand") and reader.inputs[0] is not tensor
            if halved and endpoint:
                return f"{reader.op} {reader.name} is shaped by a size read by Shape and divided"
            if not endpoint and reader.op in (*_MOVING, "Mul", "Where", "Div"):
                pending.extend((t, halved or reader.op == "Div") for t in reader.outputs)
    return None


def _bound_of(reader, tensor, read) -> bool:
    """``reader`` is a Slice of the tensor the Shape reads, bounded by ``tensor``: the head
    dims keep rotary's pairs ``j, j + d/2`` together, so ``d // 2`` of the pruned tensor (or the
    kept count the rewrite stores there) still cuts it at its middle."""
    return reader.op == "Slice" and reader.inputs[0] is read and \
        any(reader.inputs[i] is tensor for i in (1, 2) if i < len(reader.inputs)) and \
        all(t is not tensor for t in (reader.inputs[0], *reader.inputs[3:]))


def _divided(div, tensor, ctx) -> str | None:
    """``Div(size, c)`` with ``c`` a positive constant: allowed on the way to Slice bounds."""
    value = ctx.const(div.inputs[1]) if div.inputs[0] is tensor else None
    if value is not None and np.asarray(value).size == 1 and \
            float(np.asarray(value).reshape(-1)[0]) >= 1:
        return None
    return f"Div {div.name} divides a size read by Shape by a value that is not a constant"


def _step(reader, tensor, ctx) -> str | None:
    """None when ``reader`` of the size vector ``tensor`` is one of the accepted steps."""
    where = f"{reader.op} {reader.name}"
    if (reader.domain or "") not in ("", "ai.onnx"):
        return f"{where} computes on a size read by Shape"
    if reader.op in ("Reshape", "Expand") and reader.inputs[0] is not tensor:
        return None  # the shape of a Reshape/Expand: the endpoint
    if reader.op == "Shape":
        return None  # the vector's length, not its values
    if reader.op in _MOVING and (reader.op == "Concat" or reader.inputs[0] is tensor) and \
            all(t is tensor or reader.op == "Concat" or ctx.const(t) is not None
                for t in reader.inputs[1:]):
        return None
    if reader.op == "Mul" and len(reader.inputs) == 2:
        other = reader.inputs[1] if reader.inputs[0] is tensor else reader.inputs[0]
        value = ctx.const(other)
        if other is not tensor and value is not None and np.asarray(value).dtype.kind in "iu" \
                and np.asarray(value).size == 1 and int(np.asarray(value).reshape(-1)[0]) >= 1:
            return None
        return f"{where} scales a size read by Shape by a value that is not a positive constant"
    if reader.op == "Equal":
        return _decided(reader, tensor, ctx)
    if reader.op == "Where" and len(reader.inputs) == 3 and reader.inputs[2] is tensor and \
            reader.inputs[1] is not tensor and reader.inputs[0] is not tensor:
        equal = reader.inputs[0].inputs[0] if reader.inputs[0].inputs else None
        if equal is not None and equal.op == "Equal" and tensor in equal.inputs:
            return None
    return f"{where} computes on a size read by Shape"


def _decided(equal, tensor, ctx) -> str | None:
    """``Equal(s, c)`` with ``c`` negative constants feeding Where conditions only: false for
    every size, whatever the plan keeps."""
    other = equal.inputs[1] if equal.inputs[0] is tensor else equal.inputs[0]
    elements = tensor_elements(other, ctx)
    negative = elements is not None and all(e.known and e.value < 0 for e in elements)
    conditions = all(r.op == "Where" and r.inputs[0] is equal.outputs[0]
                     for r in equal.outputs[0].outputs)
    if negative and conditions and other is not tensor:
        return None
    return f"Equal {equal.name} compares a size read by Shape"


def reads_level(element: Element, ctx) -> tuple[int, int] | None:
    """(record, level) of the split level ``element`` reads by Shape, or None."""
    if element.read is None:
        return None
    tensor, axis, _ = element.read
    smap = ctx.split_map(tensor)
    if smap is None or axis not in smap.axes:
        return None
    return smap.record, smap.levels[smap.axes.index(axis)]


def runtime_count(element: Element, ctx) -> int | None:
    """What ``element`` (a size read by Shape) is when the pruned model runs: the count the
    plan keeps on the axis it reads, times its factor; None when it is not such a size or the
    axis is symbolic (``ctx``: the rewrite context)."""
    if element.read is None:
        return None
    tensor, axis, factor = element.read
    for kept_axis, keep in ctx.split_keeps(tensor):
        if kept_axis == axis:
            return len(keep) * factor
    return element.value  # the axis keeps its size (None: symbolic)

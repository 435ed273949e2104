"""Sizes for a decoder's KV cache inputs (``past_key_values.*``, issue 21).

A past key/value input is joined with the new keys/values by a ``Concat`` on its sequence axis
into a ``present`` output; that axis is a *past length*: 0 in the primary set (the first step, an empty cache) and
``PAST_LENGTH`` in the secondary one (a later step), so that verification sees both. An
attention mask spans the past and the new tokens: its length is the sequence's plus the past's,
so for a non-empty past each sequence symbol is tried at that sum in turn (the mask's own
symbol, whatever its name, is the one the model runs with).
"""
from __future__ import annotations

import onnx

from ..model.runtime import real_inputs

#: The past length of the secondary set.
PAST_LENGTH = 3
FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                    onnx.TensorProto.DOUBLE})


def past_axes(model: onnx.ModelProto) -> set[tuple[str, int]]:
    """(input, axis) of every float graph input that a Concat joins on that axis into a graph
    output (``present.* = Concat(past_key_values.*, new)``): a cache. Other joins of an input
    (two images on channels) are not: their sizes must not be 0."""
    names = {v.name: len(v.type.tensor_type.shape.dim) for v in real_inputs(model)
             if v.type.tensor_type.HasField("shape") and
             v.type.tensor_type.elem_type in FLOATS}
    outputs = {o.name for o in model.graph.output}
    found = set()
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] not in outputs:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        for name in node.input:
            if name in names:
                found.add((name, axis % names[name]))
    return found


def with_past(trials: list[dict[str, int]], past: set[str],
              sequences: set[str]) -> list[dict[str, int]]:
    """Each trial with the past symbols at ``PAST_LENGTH``: first with one sequence symbol at
    its value plus the past (the attention mask's total length), then unchanged."""
    out = []
    for trial in trials:
        step = {**trial, **dict.fromkeys(past, PAST_LENGTH)}
        out += [{**step, s: trial[s] + PAST_LENGTH} for s in sorted(sequences)] + [step]
    return out

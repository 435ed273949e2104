"""Sizes for a decoder's KV cache inputs (``past_key_values.*``, issue 21).

A past key/value input is joined with the new keys/values by a ``Concat`` on its sequence axis
into a ``present`` output, or read by a fused attention op that writes the present cache as a
graph output (com.microsoft ``GroupQueryAttention``, onnxruntime-genai's form); that axis is a
*past length*: 0 in the primary set (the first step, an empty cache) and
``PAST_LENGTH`` in the secondary one (a later step), so that verification sees both. An
attention mask spans the past and the new tokens: its length is the sequence's plus the past's,
so for a non-empty past each sequence symbol is tried at that sum in turn (the mask's own
symbol, whatever its name, is the one the model runs with). A fused op's cache may also
declare its head size symbolic (onnxruntime-genai's ``kv_cache_dim``): the op fixes it
(``cache_head_sizes``), so it is given, not searched for.
"""
from __future__ import annotations

import onnx

from ..deps.op_families import CACHE_ATTENTION, CACHE_SEQUENCE_AXIS
from ..model.runtime import real_inputs

#: The past length of the secondary set.
PAST_LENGTH = 3
FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                    onnx.TensorProto.DOUBLE})


def past_axes(model: onnx.ModelProto) -> set[tuple[str, int]]:
    """(input, axis) of every float graph input that a Concat joins on that axis into a graph
    output (``present.* = Concat(past_key_values.*, new)``): a cache. Other joins of an input
    (two images on channels) are not: their sizes must not be 0. A cache read by a fused
    attention op (``CACHE_ATTENTION``) whose present output is a graph output is one too."""
    names = {v.name: len(v.type.tensor_type.shape.dim) for v in real_inputs(model)
             if v.type.tensor_type.HasField("shape") and
             v.type.tensor_type.elem_type in FLOATS}
    outputs = {o.name for o in model.graph.output}
    found = set()
    for node in model.graph.node:
        pairs = CACHE_ATTENTION.get((node.op_type, "" if node.domain == "ai.onnx" else
                                     node.domain), ())
        for past, present in pairs:
            if past < len(node.input) and node.input[past] in names and \
                    present < len(node.output) and node.output[present] in outputs and \
                    names[node.input[past]] > CACHE_SEQUENCE_AXIS:
                found.add((node.input[past], CACHE_SEQUENCE_AXIS))
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


def cache_head_sizes(model: onnx.ModelProto) -> dict[tuple[str, int], int]:
    """(input, axis) -> size of every symbolic head-size axis of a cache that a fused attention
    op reads: its projected width over its head count (GroupQueryAttention: the packed
    q|k|v width over ``num_heads + 2 kv_num_heads``, or the key width over ``kv_num_heads``)."""
    names = {v.name: v.type.tensor_type.shape.dim for v in real_inputs(model)
             if v.type.tensor_type.HasField("shape")}
    found = {}
    for node in model.graph.node:
        pairs = CACHE_ATTENTION.get((node.op_type, "" if node.domain == "ai.onnx" else
                                     node.domain), ())
        pasts = [node.input[p] for p, _ in pairs if p < len(node.input) and
                 node.input[p] in names and len(names[node.input[p]]) == 4 and
                 not names[node.input[p]][3].HasField("dim_value")]
        size = _head_size(model, node) if pasts else None
        found.update({(name, 3): size for name in pasts if size})
    return found


def _head_size(model: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    packed = len(node.input) < 2 or not node.input[1]
    if node.op_type == "GroupQueryAttention":
        heads, kv = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
        width, count = (_width(model, node.input[0]), heads + 2 * kv) if packed else \
            (_width(model, node.input[1]), kv)
    else:
        width = _width(model, node.input[0])
        count = int(attrs.get("num_heads", attrs.get("q_num_heads", 0)))
    return width // count if width and count > 0 and width % count == 0 else None


def _width(model: onnx.ModelProto, name: str) -> int | None:
    """The static last dim of ``name``: from value_info, else from the projection writing it
    (a MatMul of a stored weight, a MatMulNBits' ``N``)."""
    for value in model.graph.value_info:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return dims[-1].dim_value
    stored = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if name in node.output:
            if node.op_type == "MatMulNBits":
                return next((a.i for a in node.attribute if a.name == "N"), None)
            if node.op_type == "MatMul" and len(node.input) > 1 and \
                    len(stored.get(node.input[1], ())) == 2:
                return stored[node.input[1]][1]
    return None

"""The oracle across an allowed interface change (``--allow-interface-change``, issue 21).

A KV cache that shrank with its heads (and head dims) is checked on what both models share: the
pruned model is fed the original's past with the removed heads and dims dropped, and its present
outputs are compared with the masked original's restricted to the kept heads and dims. Every
other input and output must be exactly as before.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..deps.interface import InterfaceChange


def declared_after(model: onnx.ModelProto, changes: list[InterfaceChange]) -> onnx.ModelProto:
    """A light copy of ``model``'s interface (no nodes, no weights) with ``changes`` applied."""
    graph = onnx.GraphProto()
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.initializer.extend(onnx.TensorProto(name=t.name) for t in model.graph.initializer)
    by_name = {c.name: c for c in changes}
    for value in (*graph.input, *graph.output):
        change = by_name.get(value.name)
        for axis, kept in ({} if change is None else change.kept).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_param")
            dim.dim_value = len(kept)
    copy = onnx.ModelProto()
    copy.graph.CopyFrom(graph)
    return copy


def pruned_feeds(feeds: dict[str, np.ndarray], changes: list[InterfaceChange]
                 ) -> dict[str, np.ndarray]:
    """``feeds`` with each shrunk input restricted to its kept heads (and head dims)."""
    if not changes:
        return feeds
    out = dict(feeds)
    for change in changes:
        if change.is_input and change.name in out:
            out[change.name] = change.restrict(out[change.name])
    return out


def kept_expected(names: list[str], expected: list, changes: list[InterfaceChange]) -> list:
    """The reference's outputs, each shrunk output restricted to its kept heads (and dims)."""
    outputs = {c.name: c for c in changes if not c.is_input}
    if not outputs:
        return expected
    return [outputs[name].restrict(np.asarray(value))
            if name in outputs else value for name, value in zip(names, expected)]

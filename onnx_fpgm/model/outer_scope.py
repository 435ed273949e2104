"""Control-flow bodies (If branches, Loop/Scan bodies): the graphs pruning walks with the top one.

The bodies are part of the channel analysis and the rewrite (``walked_bodies``,
``with_bodies``): a layer inside one is pruned when its channels stay inside the body (they do
not reach its outputs, which carry values out of it or into the next iteration).

Constants that bodies read from the outer graph stay in the outer graph. graph-surgeon exports a
constant that only bodies read as an initializer of every body that reads it (silero VAD's LSTM
weights, read by both branches of an ``If``: the pruned file came out larger than the input, and
counting the outer graph reported the weights as removed). After the export, each such copy goes
back to the outer graph once, where the input had it; subgraphs see outer names, so the model
computes the same. The layers left whole inside bodies are listed for the report.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs

#: The attributes that hold the bodies the analysis walks, by op.
WALKED = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def walked_bodies(node: gs.Node) -> list[gs.Graph]:
    """The bodies of an If/Loop/Scan node (graph-surgeon), else nothing."""
    names = WALKED.get(node.op, ()) if (node.domain or "") in ("", "ai.onnx") else ()
    return [node.attrs[k] for k in names if isinstance(node.attrs.get(k), gs.Graph)]


def with_bodies(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph``, then every walked body below it (nested ones too): the graphs whose nodes
    the analysis and the rewrite visit."""
    yield graph
    for node in graph.nodes:
        for body in walked_bodies(node):
            yield from with_bodies(body)


def proto_with_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``with_bodies`` for a ``GraphProto``."""
    yield graph
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name in WALKED.get(node.op_type, ()) and \
                        attr.type == onnx.AttributeProto.GRAPH:
                    yield from proto_with_bodies(attr.g)


def hoist_outer_constants(model: onnx.ModelProto, like: onnx.ModelProto) -> int:
    """Move subgraph initializers named like a top-level constant of ``like`` to the top level.

    A name is moved only when every copy holds the same bytes; a copy of a name the top level
    already holds (the outer users kept it) is dropped when identical. Returns how many
    subgraph initializers were moved or dropped.
    """
    outer_names = {t.name for t in like.graph.initializer}
    outer_names |= {o for n in like.graph.node if n.op_type == "Constant" for o in n.output}
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for body in _bodies(model.graph):
        for tensor in body.initializer:
            if tensor.name in outer_names:
                copies.setdefault(tensor.name, []).append((body, tensor))
    top = {t.name: t for t in model.graph.initializer}
    top_outputs = {o for n in model.graph.node for o in n.output}
    moved = 0
    for name, found in copies.items():
        payloads = {t.SerializeToString(deterministic=True) for _, t in found}
        if name in top:
            payloads.add(top[name].SerializeToString(deterministic=True))
        if len(payloads) != 1 or name in top_outputs:
            continue  # copies that differ, or a name the top level computes: leave them
        if name not in top:
            kept = onnx.TensorProto()
            kept.CopyFrom(found[0][1])
            model.graph.initializer.append(kept)
        for body, tensor in found:
            body.initializer.remove(tensor)
            moved += 1
    return moved


def layers_in_bodies(model: onnx.ModelProto, ops: Iterable[str]) -> list[str]:
    """``op name`` of every node of ``ops`` inside a control-flow body (nested ones too): the
    layers that pruning leaves untouched, for the report."""
    wanted = set(ops)
    return [f"{node.op_type} {node.name}" for body in _bodies(model.graph) for node in body.node
            if node.op_type in wanted]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it: where stored constants lie."""
    yield graph
    yield from _bodies(graph)


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph below ``graph``, nested ones included."""
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
            for sub in subgraphs:
                yield sub
                yield from _bodies(sub)

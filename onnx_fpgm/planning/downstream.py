"""The part of the masked model that one group's removal can change, as a model of its own.

A probe of a group changes only the masks (and, with the OBS update, the fed weights) of the
consumers of that group's channels: every node upstream of them computes what the reference run
computed. So each group gets one model over the nodes downstream of those inputs, whose inputs
are the tensors crossing into that part (their reference values are cached once, by one run of
the whole model) plus the masks and weights it reads; every level of the group is then one run
of that part (measured on YOLOv8n: on average 46 % of the Conv MACs lie downstream of a group).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..measure.calibration import Calibration, static_batch
from ..model.runtime import make_session
from ..recover.layers import expose

#: Kept as ``Constant`` nodes in a part rather than fed from the reference.
_SOURCE_OPS = ("Constant",)


@dataclass
class Part:
    """The nodes a set of changed graph inputs reaches, and what they read from outside."""

    nodes: list[onnx.NodeProto]
    crossing: list[str]  # tensors computed upstream (or model inputs): fed their reference
    feeds: list[str]  # mask / weight graph inputs the part reads
    outputs: list[int]  # indices of the model outputs the part computes


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """What ``node`` reads: its inputs and the outer names its bodies (If/Loop/Scan) use."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
            list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for body in bodies:
            defined = {v.name for v in body.input} | {t.name for t in body.initializer}
            for inner in body.node:
                names |= node_inputs(inner) - defined
                defined.update(inner.output)
    return names


def downstream_part(model: onnx.ModelProto, changed: set[str], fed: set[str]) -> Part | None:
    """The nodes of ``model`` (topologically sorted) that depend on the graph inputs
    ``changed`` and lead to an output; None when no output depends on them. ``fed`` names
    every mask / weight input (the probe feeds them; all other crossing tensors are read
    from the reference)."""
    graph = model.graph
    tainted = set(changed)
    reached = []
    for node in graph.node:
        if node_inputs(node) & tainted:
            reached.append(node)
            tainted.update(o for o in node.output if o)
    outputs = [i for i, o in enumerate(graph.output) if o.name in tainted]
    if not outputs:
        return None
    source = {o: node for node in graph.node if node.op_type in _SOURCE_OPS and not node.input
              for o in node.output}
    needed = {graph.output[i].name for i in outputs}
    kept = []
    for node in reversed(reached):  # only what leads to an output
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= node_inputs(node)
    constants = [source[name] for name in sorted(needed) if name in source]
    kept = constants + kept[::-1]
    produced = {o for node in kept for o in node.output}
    initializers = {t.name for t in graph.initializer}
    outside = sorted(needed - produced - initializers)
    return Part(kept, [n for n in outside if n not in fed], [n for n in outside if n in fed],
                outputs)


def part_model(model: onnx.ModelProto, part: Part, crossing: dict[str, np.ndarray],
               batch_free: bool) -> bytes:
    """The serialised model of ``part``: its crossing tensors become inputs typed as their
    reference values (``crossing``: name -> one chunk's value; with ``batch_free`` the first
    dim is left free, as the chunks' sizes may differ)."""
    graph = model.graph
    declared = {v.name: v for v in graph.input}
    inputs = []
    for name in part.crossing:
        value = crossing[name]
        shape = list(value.shape)
        if batch_free and shape:
            shape[0] = "batch"
        inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), shape))
    inputs += [declared[name] for name in part.feeds]
    read = set().union(*(node_inputs(node) for node in part.nodes))
    initializers = [t for t in graph.initializer if t.name in read]
    known = {v.name: v for v in graph.value_info}
    produced = {o for node in part.nodes for o in node.output}
    value_info = [known[name] for name in sorted(produced) if name in known]
    sub = helper.make_graph(part.nodes, f"{graph.name}_part", inputs,
                            [graph.output[i] for i in part.outputs], initializers,
                            value_info=value_info)
    proto = helper.make_model(sub, opset_imports=model.opset_import,
                              ir_version=model.ir_version)
    return proto.SerializeToString()


@dataclass
class Reference:
    """The whole model's outputs and the crossing tensors' values, per calibration chunk."""

    outputs: list[np.ndarray]  # concatenated over the chunks
    chunks: list[dict[str, np.ndarray]]  # per chunk: graph input / crossing tensor -> value
    batch_free: bool


def chunks_of(model: onnx.ModelProto, calibration: Calibration) -> list[dict[str, np.ndarray]]:
    """The calibration inputs in the chunks ``run_batched`` would use."""
    batch = static_batch(model, calibration)
    n = calibration.n_samples
    step = batch or min(n, 64)
    chunks = []
    for start in range(0, n, step):
        feeds = {k: v[start:start + step] for k, v in calibration.inputs.items()}
        if batch and len(next(iter(feeds.values()))) != batch:
            break  # a static batch that does not divide the data: drop the remainder
        chunks.append(feeds)
    return chunks


def run_reference(model: onnx.ModelProto, chunks: list[dict[str, np.ndarray]],
                  constant_feeds: dict[str, np.ndarray], crossing: list[str],
                  batch_free: bool) -> Reference:
    """One run of the whole model over ``chunks`` exposing the ``crossing`` tensors (those
    that are graph inputs are taken from the chunks)."""
    names = [o.name for o in model.graph.output]
    graph_inputs = {v.name for v in model.graph.input}
    exposed = [n for n in crossing if n not in graph_inputs and n not in names]
    # unoptimised: onnxruntime's fusions drop intermediate tensors even when they are graph
    # outputs (microsoft/onnxruntime#4110; seen here: Conv + Add with fed weights)
    session = make_session(expose(model, exposed))
    outputs, kept = [], []
    for feeds in chunks:
        values = session.run(names + exposed, {**feeds, **constant_feeds})
        by_name = dict(zip(names + exposed, values))
        outputs.append(values[:len(names)])
        kept.append({n: feeds[n] if n in feeds else by_name[n] for n in crossing})
    return Reference([np.concatenate([c[i] for c in outputs]) for i in range(len(names))],
                     kept, batch_free)


class PartRunner:
    """One session over a part: a probe feeds it masks and weights, the rest is the
    reference's."""

    def __init__(self, model: onnx.ModelProto, part: Part, reference: Reference) -> None:
        self.part = part
        self.reference = reference
        proto = part_model(model, part, reference.chunks[0], reference.batch_free)
        self.session = make_session(proto, optimize=True)
        self.names = [model.graph.output[i].name for i in part.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every model output: the part's recomputed, the others the reference's."""
        mine = {name: feeds[name] for name in self.part.feeds}
        chunks = [self.session.run(self.names, {**{n: c[n] for n in self.part.crossing}, **mine})
                  for c in self.reference.chunks]
        outputs = list(self.reference.outputs)
        for j, i in enumerate(self.part.outputs):
            outputs[i] = np.concatenate([c[j] for c in chunks])
        return outputs

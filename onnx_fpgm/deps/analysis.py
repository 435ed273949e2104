"""Channel propagation over the whole graph: channel maps, couplings, groups.

Every producer (a Conv's filters, a Gemm/MatMul's output features) creates *atoms*, one per output
channel. Each activation tensor may carry a :class:`ChannelMap`: the axis that holds channels and,
for each position on it, the atom found there (-1: a position no producer of ours owns, e.g. a
graph input's channel). Handlers move maps through ops (Transpose moves the axis, Flatten repeats
labels, Concat joins them, Split cuts them) and record three facts:

* coupling: two positions must hold the same channel (both inputs of a residual ``Add``), so their
  atoms are removed together (union-find -> *classes*);
* cuts: a ``Split``/``Slice`` cuts a producer into parts that are pruned as independent groups;
* blocks: a channel reaching something we cannot rewrite exactly (a graph output, an unknown op,
  a reduction over channels) is never removed; the reason is kept for the report.

A *group* is a set of classes that are scored together and pruned at one sparsity: the classes
coupled with each other plus the neighbouring channels of the same producer (unless cut).

The working state is ``context.AnalysisContext``; the result types are in ``channels``. This
module walks the graph and asks each node's handler (``registry``) to propagate.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..model.outer_scope import walked_bodies, with_bodies
from .blocks import block_split_readers
from .channels import Analysis
from .context import AnalysisContext
from .interface import cache_inputs
from .op_families import QUANTIZED_LAYERS
from .registry import handler_for
from .shared_weights import couple_shared_uses
from .shape_inference import refine_shapes

logger = logging.getLogger(__name__)


def build_analysis(graph: gs.Graph, opset: int, overridable: frozenset[str] = frozenset(),
                   allow_interface_change: bool = False) -> Analysis:
    """Propagate channel maps through ``graph`` (topologically ordered) and build the groups.

    ``overridable`` names initializers that are also graph inputs: not treated as constants.
    The bodies of If/Loop/Scan nodes are walked in place (``_walk_bodies``).
    ``allow_interface_change``: KV-cache inputs/outputs may shrink with their heads
    (``interface.py``); every other graph output still blocks the channels reaching it.
    """
    ctx = AnalysisContext(graph, opset, overridable,
                          cache_inputs(graph) if allow_interface_change else frozenset())
    _walk(graph.nodes, ctx)
    couple_shared_uses([n for g in with_bodies(graph) for n in g.nodes], ctx)
    for out in graph.outputs:
        if out.name not in ctx.changeable_outputs:
            ctx.block_tensor(out, f"reaches graph output {out.name}")
        if out.name in ctx.shape_maps:
            ctx.block(ctx.shape_maps[out.name], f"channel count reaches graph output {out.name}")
    return ctx.finish()


def _walk(nodes: list[gs.Node], ctx: AnalysisContext) -> None:
    """Propagate through ``nodes`` in order; If/Loop/Scan bodies are walked in place."""
    for node in nodes:
        refine_shapes(node, ctx)
        ctx.check_shape_taint(node)
        if walked_bodies(node):
            _walk_bodies(node, ctx)
            continue
        subgraph_reason = _subgraph_reason(node)
        handler = handler_for(node.op, node.domain or "")
        if subgraph_reason:
            ctx.block_inputs(node, subgraph_reason)
            _block_outer_references(node, ctx, subgraph_reason)
            continue
        if handler is None:
            ctx.block_inputs(node, f"consumed by unsupported op {node.op} ({node.name})")
            if node.op in QUANTIZED_LAYERS and node.outputs:
                ctx.blocked_tensors.append(
                    (node.outputs[0].name, f"{node.op} {node.name}: QOperator quantized layers "
                                           "are not pruned (no handler)"))
            continue
        block_split_readers(node, handler, ctx)
        try:
            handler.propagate(node, ctx)
        except Exception as err:  # a handler bug must never yield a wrong model: block instead
            logger.warning("analysis of %s (%s) failed: %s", node.name, node.op, err)
            ctx.block_inputs(node, f"could not analyse {node.op} ({node.name}): {err}")
            for out in node.outputs:
                ctx.maps.pop(out.name, None)
                ctx.split_maps.pop(out.name, None)


def _walk_bodies(node: gs.Node, ctx: AnalysisContext) -> None:
    """The bodies of an If/Loop/Scan are part of the channel analysis: a layer inside one (its
    weights stored in the body, or outer constants) creates atoms like any other, and a group
    that stays inside the body is pruned there. The node's inputs (an If's condition, a Loop's
    trip count and initial values, a Scan's sequences) and outputs carry no map, so channels
    that reach them, or a body's outputs, are blocked (kept whole in every branch). An outer
    tensor with channels that a body reads is followed in by the body's handlers like any other
    input, so its readers in every body are rewritten (and masked by the oracle) alike."""
    ctx.block_inputs(node, f"consumed by control-flow op {node.op} ({node.name}) as an input")
    outer = ctx.graph
    for body in walked_bodies(node):
        ctx.graph = body  # a handler asking for "the graph's outputs" means the body's
        _walk(body.nodes, ctx)
        ctx.graph = outer
        for out in body.outputs:
            ctx.block_tensor(out, f"reaches the outputs of {node.op} {node.name} (body "
                                  f"{body.name}), which stay whole")
            if out.name in ctx.shape_maps:
                ctx.block(ctx.shape_maps[out.name],
                          f"channel count reaches the outputs of {node.op} {node.name}")


def _subgraph_reason(node: gs.Node) -> str | None:
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return f"consumed by control-flow op {node.op} ({node.name}), left untouched"
    return None


def _block_outer_references(node: gs.Node, ctx: AnalysisContext, reason: str) -> None:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for sub in value.nodes:
                for tensor in sub.inputs:
                    ctx.block_tensor(tensor, reason)
                _block_outer_references(sub, ctx, reason)

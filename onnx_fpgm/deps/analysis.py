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

from .blocks import block_split_readers
from .channels import Analysis
from .context import AnalysisContext
from .op_families import QUANTIZED_LAYERS
from .registry import handler_for
from .shape_inference import refine_shapes

logger = logging.getLogger(__name__)


def build_analysis(graph: gs.Graph, opset: int,
                   overridable: frozenset[str] = frozenset()) -> Analysis:
    """Propagate channel maps through ``graph`` (topologically ordered) and build the groups.

    ``overridable`` names initializers that are also graph inputs: not treated as constants.
    """
    ctx = AnalysisContext(graph, opset, overridable)
    for node in graph.nodes:
        refine_shapes(node, ctx)
        ctx.check_shape_taint(node)
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
    for out in graph.outputs:
        ctx.block_tensor(out, f"reaches graph output {out.name}")
        if out.name in ctx.shape_maps:
            ctx.block(ctx.shape_maps[out.name], f"channel count reaches graph output {out.name}")
    return ctx.finish()


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

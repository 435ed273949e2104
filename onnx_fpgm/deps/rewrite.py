"""Apply a plan to the graph: every handler slices its node's constants and fixes attributes.

Graph inputs/outputs never change (channels reaching them are blocked), node names are kept, and
kept weights are copied bit-exactly with ``np.take`` in their original order. The bodies of
If/Loop/Scan are rewritten like the top graph (their outputs never change either).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from ..model.outer_scope import with_bodies
from .channels import Analysis
from .registry import handler_for
from .rewrite_context import RewriteContext
from .shared_weights import merge_alike_copies


def apply_plan(graph: gs.Graph, analysis: Analysis, removed_classes: np.ndarray,
               opset: int) -> list[str]:
    """Rewrite ``graph`` in place, removing the channel classes ``removed_classes`` (a plan's
    ``removed_classes``: the rewrite needs no more of the plan, so it sits below planning);
    returns notes (copy-on-write events) for the report."""
    if not len(removed_classes):
        return []
    removed = analysis.removed_atoms(removed_classes)
    graphs = list(with_bodies(graph))  # bodies are rewritten like the top graph
    already_dead = [_dead_outputs(g) for g in graphs]
    ctx = RewriteContext(graph, analysis, removed, opset)
    touched = _touched_nodes(graphs, analysis, removed)
    for part in graphs:
        ctx.graph, ctx.added_nodes = part, []  # copies a handler adds go into this graph
        for node in list(part.nodes):
            if id(node) not in touched:
                continue
            handler = handler_for(node.op, node.domain or "")
            if handler is None:
                raise RewriteError(f"{node.op} {node.name} touches pruned channels but has no "
                                   "handler")
            try:
                handler.apply(node, ctx)
            except RewriteError:
                raise
            except Exception as err:
                raise RewriteError(f"rewriting {node.op} {node.name} failed: {err}") from err
        if ctx.added_nodes:  # private copies (quantizers, shape paths) were appended at the end
            _place_added(part, ctx.added_nodes)
    merge_alike_copies(ctx.copies, ctx.notes, {t.name for g in graphs for t in g.outputs})
    # Remove what our copies made unused (constant chains we replaced), not branches that fed
    # no output before: those are the user's and stay, like every other node.
    for part, dead in zip(graphs, already_dead):
        outputs = list(part.outputs)
        part.outputs.extend(dead)
        part.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        part.outputs = outputs
    return ctx.notes


def _place_added(graph: gs.Graph, added: list[gs.Node]) -> None:
    """Move every added node just before its first reader: the original nodes keep their order
    (a full toposort would reorder them)."""
    added_ids = {id(n) for n in added}
    placed: set[int] = set()
    order: list[gs.Node] = []

    def place_producers(node: gs.Node) -> None:
        for tensor in node.inputs:
            for producer in getattr(tensor, "inputs", []) if tensor is not None else []:
                if id(producer) in added_ids and id(producer) not in placed:
                    placed.add(id(producer))
                    place_producers(producer)
                    order.append(producer)

    for node in graph.nodes:
        if id(node) not in added_ids:
            place_producers(node)
            order.append(node)
    order += [n for n in graph.nodes if id(n) in added_ids and id(n) not in placed]
    graph.nodes = order


def _dead_outputs(graph: gs.Graph) -> list[gs.Tensor]:
    """Output tensors of nodes from which no graph output is reachable."""
    live = {id(t) for t in graph.outputs}
    dead: list[gs.Tensor] = []
    for node in reversed(graph.nodes):
        if any(id(t) in live for t in node.outputs):
            live.update(id(t) for t in node.inputs if t is not None)
        else:
            dead.extend(t for t in node.outputs if t is not None and t.name)
    return dead


def _touched_nodes(graphs: list[gs.Graph], analysis: Analysis, removed: np.ndarray) -> set:
    """Nodes reading or writing a tensor that loses channels."""
    shrinking = {name for name, labels in analysis.all_labels() if removed[labels].any()}
    touched: set = set()
    for node in (n for g in graphs for n in g.nodes):
        names = [t.name for t in node.inputs if t is not None] + [t.name for t in node.outputs]
        if any(n in shrinking for n in names):
            touched.add(id(node))  # names may repeat across bodies
    return touched

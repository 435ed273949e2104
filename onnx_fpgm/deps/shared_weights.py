"""A constant that several nodes read (ALBERT's one layer applied N times): one slice for all.

The analysis couples the uses of a shared weight (``couple_shared_uses``): nodes of one op and
attributes reading the same stored constant at the same input have the same filters, so their
output channels are coupled position by position, and so are their other inputs' channels
(the weight's input axis). A use whose channels are blocked is left out (``finish`` checks), so
that use keeps the whole weight and the others get a sliced copy, as before.

The rewrite gives each pruned reader of a shared constant its own sliced copy (copy-on-write,
``rewrite_context``); ``merge_alike_copies`` then puts the copies back into the original when
every reader ended up with the same bytes: one initializer, its own name, read by all of them.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .constants import root_constant


def shared_uses(nodes: list[gs.Node], source_nodes: set[str]) -> list[list[gs.Node]]:
    """Sets of at least two source nodes that read one stored constant at the same input index
    with the same op, domain and attributes: the same filters, applied more than once."""
    uses: dict[tuple, list[gs.Node]] = {}
    for node in nodes:
        if node.name not in source_nodes:
            continue
        for index, tensor in enumerate(node.inputs):
            found = root_constant(tensor) if tensor is not None and tensor.name else None
            if found is None or found[1]:
                continue
            key = (id(found[0]), index, node.op, node.domain, repr(sorted(node.attrs.items())))
            uses.setdefault(key, []).append(node)
    return [readers for readers in uses.values() if len(readers) > 1]


def merge_alike_copies(copies: list[tuple[gs.Constant, gs.Constant, int]],
                       notes: list[str], graph_outputs: set[str]) -> None:
    """Store a shared constant's sliced copies back into it where all its readers agree.

    ``copies``: (original, copy, index of the copy's note). A family is an original and every
    copy made from it (or from its copies); when every member still read holds the same dtype,
    shape and bytes, the original takes that value and all readers read it; the copies' notes
    give way to one note. Families whose readers differ keep their copies.
    """
    parent: dict[int, gs.Constant] = {}
    for original, copy, _ in copies:
        parent[id(copy)] = original

    def root(tensor: gs.Constant) -> gs.Constant:
        while id(tensor) in parent:
            tensor = parent[id(tensor)]
        return tensor

    families: dict[int, list] = {}
    for original, copy, note in copies:
        base = root(original)
        family = families.setdefault(id(base), [base, [base], []])
        family[1].append(copy)
        family[2].append(note)
    dropped: set[int] = set()
    for base, members, family_notes in families.values():
        live = [m for m in members if _read(m, graph_outputs)]
        if not live or base.name in graph_outputs or any(m.name in graph_outputs for m in live):
            continue
        first = np.asarray(live[0].values)
        if not all(_same(first, np.asarray(m.values)) for m in live[1:]):
            continue
        readers = [(node, k) for m in members if m is not base for node in list(m.outputs)
                   for k, t in enumerate(node.inputs) if t is m]
        base.values = first
        for node, k in readers:
            node.inputs[k] = base
        dropped.update(family_notes)
        count = len(readers) + (base in live)
        notes.append(f"{base.name} is shared by {count} nodes that keep the same channels: "
                     "sliced once, in place")
    notes[:] = [n for i, n in enumerate(notes) if i not in dropped]


def _read(tensor: gs.Tensor, graph_outputs: set[str]) -> bool:
    """Whether anything reads ``tensor``: a node, or a graph output (through ``Identity``
    nodes, which a copy made for their reader bypassed)."""
    if tensor.name in graph_outputs:
        return True
    return any(node.op != "Identity" or any(_read(t, graph_outputs) for t in node.outputs)
               for node in tensor.outputs)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def couple_shared_uses(nodes: list[gs.Node], ctx) -> None:
    """Offer the couplings of each set of ``shared_uses`` to ``ctx.share`` (the analysis'
    context): output channels position by position, and each other input's channels where
    both uses map it alike (a position mapped in one use only cannot agree: not offered)."""
    sources = {s.node: s for s in ctx.sources}
    for readers in shared_uses(nodes, set(sources)):
        first = readers[0]
        for other in readers[1:]:
            a, b = sources[first.name], sources[other.name]
            if a.n == b.n:
                ctx.share(np.arange(a.start, a.start + a.n), np.arange(b.start, b.start + b.n))
            for k, (x, y) in enumerate(zip(first.inputs, other.inputs)):
                mx, my = ctx.map(x), ctx.map(y)
                if mx is None or my is None or mx.axis != my.axis or \
                        mx.labels.shape != my.labels.shape:
                    continue
                if np.array_equal(mx.labels >= 0, my.labels >= 0):
                    both = mx.labels >= 0
                    ctx.share(mx.labels[both], my.labels[both])

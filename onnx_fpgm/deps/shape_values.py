"""Shape vectors element by element: constants, dims of tensors, channel counts.

Exporters compute shape parameters from ``Shape`` ops, so a Reshape target or Resize ``sizes``
is often only partly constant:

* tf2onnx's Keras Flatten: ``Reshape(x, Cast(Concat(Slice(Cast(Gather(Shape(y), perm)), 0:1),
  [25088])))``: the batch is computed, the channel-carrying 25088 is a stored constant;
* torch's ``x.view(x.size(0), -1)``: ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``, or
  ``Concat(Shape(x, end=1), [-1])`` from the dynamo exporter;
* an FPN neck's ``Resize(x, sizes=Concat(Slice(Shape(x), 0:2), Slice(Shape(y), 2:4)))``;
* TorchScript's ``expand``: ``Where(Equal(s, -ones), ones, s)`` (``-1`` keeps a dim), and its
  cache export's ``repeat_kv`` merge ``Mul(Gather(Shape(k), 1), n_rep)``.

This module follows 1-D integer tensors through the ops that move elements without computing on
them (``Shape``, ``Gather``/``Slice`` with constant indices, ``Concat``, ``Cast``, ``Identity``,
``Unsqueeze``/``Squeeze``/``Reshape``/``Flatten`` of a vector; ``Mul``, for ``c * h * w``;
``ConstantOfShape``; ``Where(Equal(a, b), x, y)`` where the equality is decided) and describes
every element:

* a known integer, with where it is stored (:class:`Source`: the node reading the stored
  constant, the input index, the flat position), so that a handler rewrites that one element
  where it lives and leaves the computed elements computed;
* a dimension of a tensor (``symbol``: the dim_param, or a per-tensor token when unnamed), with
  the channel labels when it is the size of one of our channel axes: such a channel count follows
  the plan by itself at run time; and, with ``read``, the tensor and axis ``Shape`` read it
  from (times a constant factor): ``symbolic_sizes`` accepts such a size on a split level that
  shrinks, because it shrinks with it;
* unknown (computed by arithmetic): ``value`` and ``symbol`` both None.

A value computed by arithmetic from a channel count that folds to a constant (static shapes)
keeps the labels it came from in ``derived``, so that it is never mistaken for a free constant.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..model.runtime import ANONYMOUS
from .same_dims import dim_token

#: Ops whose output elements are followed one by one from their inputs' elements: moved
#: without computing on them, or (``Mul``) scaled, so ``c * h * w`` still names its channels.
ELEMENT_MOVING_OPS = frozenset({"Identity", "Cast", "Concat", "Gather", "Slice", "Unsqueeze",
                                "Squeeze", "Reshape", "Flatten", "Shape", "Mul", "Where",
                                "ConstantOfShape"})
#: Arithmetic evaluated element by element where both sides are known.
ARITHMETIC_OPS = frozenset({"Add", "Sub", "Div"})
_MAX_ELEMENTS = 64  # shape vectors are short; anything longer is data


@dataclass(frozen=True)
class Source:
    """Where a constant element is stored: ``node.inputs[index]``, flat ``position``.

    ``exclusive``: every tensor between ``node`` and the shape parameter has that one reader,
    so editing the constant changes nothing else (the constant itself may still be shared:
    ``RewriteContext.set_input_value`` copies it then).
    """

    node: gs.Node
    index: int
    position: int
    exclusive: bool
    #: the whole tensor's values when they are known but not stored (computed from static
    #: dims): the rewrite then gives ``node`` a constant in place of the computation
    values: tuple[int, ...] | None = None
    #: (node, input index) of the shape parameter the element ends in; when the path is not
    #: exclusive, the rewrite gives that node a private copy of the path (``RewriteContext``)
    target: tuple[gs.Node, int] | None = None
    #: the element is ``scale`` times the stored value (a fixed dim read by ``Shape`` times a
    #: stored constant: TorchScript's ``kv_heads * n_rep``); the rewrite stores value / scale
    scale: int = 1


@dataclass(frozen=True, eq=False)
class Element:
    """One element of a shape vector (see the module docstring)."""

    value: int | None = None
    symbol: str | None = None
    labels: np.ndarray | None = None
    source: Source | None = None
    #: channel labels whose count this value was computed from, e.g. ``C // 2``
    derived: np.ndarray | None = None
    #: with ``labels``: the element is ``factor`` times that channel count (``c * h * w``)
    factor: int = 1
    #: (tensor, axis, factor): the element is ``factor`` times ``tensor``'s size on ``axis`` as
    #: ``Shape`` reads it at run time (``symbolic_sizes``: a size that follows a pruned level)
    read: tuple[gs.Tensor, int, int] | None = None

    @property
    def channels(self) -> np.ndarray | None:
        """Labels of a channel count this element is, or was computed from."""
        return self.labels if self.labels is not None else self.derived

    @property
    def known(self) -> bool:
        return self.value is not None


def symbolic_dims(tensor: gs.Tensor | None) -> list[int | str] | None:
    """The tensor's dims: ints where static, else the dim_param, else ``same_dims``' token."""
    if tensor is None or tensor.shape is None:
        return None
    dims: list[int | str] = []
    for axis, dim in enumerate(tensor.shape):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            dims.append(int(dim))
        elif isinstance(dim, str) and dim.strip() not in ANONYMOUS:
            dims.append(dim)
        else:  # unnamed, or a name that names nothing (Paddle writes ``?`` for H and W alike)
            dims.append(dim_token(tensor, axis))
    return dims


def shape_elements(node: gs.Node, index: int, ctx) -> list[Element] | None:
    """Elements of the 1-D integer tensor ``node.inputs[index]``; None when not a short vector.

    ``ctx`` is an analysis or rewrite context (``const``, ``map``, ``graph``).
    """
    tensor = node.inputs[index] if index < len(node.inputs) else None
    elements = _elements(tensor, ctx, (node, index), exclusive=True, depth=0)
    if elements is None:
        return None
    return [e if e.source is None or e.source.exclusive else
            replace(e, source=replace(e.source, target=(node, index))) for e in elements]


def tensor_elements(tensor: gs.Tensor, ctx) -> list[Element] | None:
    """Elements of ``tensor`` without sources (for reading, not rewriting)."""
    return _elements(tensor, ctx, None, exclusive=False, depth=0)


def _elements(tensor: gs.Tensor | None, ctx, reader: tuple[gs.Node, int] | None,
              exclusive: bool, depth: int) -> list[Element] | None:
    """Elements of ``tensor``, read by ``reader`` (node, input index) when sources are wanted."""
    if tensor is None or not tensor.name or depth > 32:
        return None
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    if producer is not None and producer.op in ELEMENT_MOVING_OPS and \
            (producer.domain or "") in ("", "ai.onnx"):
        alone = exclusive and len(tensor.outputs) == 1 and \
            tensor.name not in {t.name for t in ctx.graph.outputs}
        moved = _moved(producer, ctx, reader is not None, alone, depth + 1)
        if moved is not None:
            return _with_reader_sources(moved, reader, exclusive)
    if producer is not None and producer.op in ARITHMETIC_OPS and \
            (producer.domain or "") in ("", "ai.onnx"):
        computed = _arithmetic(producer, ctx, depth + 1)
        if computed is not None:
            return _with_reader_sources(computed, reader, exclusive)
    # A value computed from a channel count is tainted (``analysis``): say so.
    tainted = getattr(ctx, "shape_maps", {}).get(tensor.name)
    derived = None if tainted is None else tainted.labels
    value = ctx.const(tensor)
    if value is None:
        shape = tensor.shape
        if shape is not None and len(shape) <= 1 and all(isinstance(d, int) for d in shape) \
                and int(np.prod(shape)) <= _MAX_ELEMENTS:
            return [Element(derived=derived)] * int(np.prod(shape))  # computed elements
        return None
    if value.ndim > 1 or value.size > _MAX_ELEMENTS or value.dtype.kind not in "iu":
        return None
    return [Element(int(v), source=None if reader is None else
                    Source(reader[0], reader[1], k, exclusive), derived=derived)
            for k, v in enumerate(value.reshape(-1).tolist())]


def _moved(node: gs.Node, ctx, sources: bool, exclusive: bool,
           depth: int) -> list[Element] | None:
    """Elements of ``node``'s output, from its inputs' elements."""
    op = node.op

    def input_elements(i: int) -> list[Element] | None:
        tensor = node.inputs[i] if i < len(node.inputs) else None
        return _elements(tensor, ctx, (node, i) if sources else None, exclusive, depth)

    if op == "Shape":
        return _shape_of(node, ctx)
    if op == "Concat":
        parts = [input_elements(i) for i in range(len(node.inputs))]
        if any(p is None for p in parts):
            return None
        return [e for part in parts for e in part]
    if op == "Where":
        return _selected(node, ctx, input_elements, depth)
    data = input_elements(0)
    if data is None:
        return None
    if op == "Gather":
        if int(node.attrs.get("axis", 0)) not in (0, -1) or len(node.inputs) < 2:
            return None
        picked = ctx.const(node.inputs[1])
        if picked is None or np.asarray(picked).ndim > 1:
            return None
        n = len(data)
        picked = [int(p) + n if p < 0 else int(p) for p in np.asarray(picked).reshape(-1)]
        return [data[p] for p in picked] if all(0 <= p < n for p in picked) else None
    if op == "Slice":
        return _sliced(node, ctx, data)
    if op == "Mul":
        other = input_elements(1)
        return None if other is None else _product(data, other)
    if op == "ConstantOfShape":
        return _filled(node, data)
    return data  # Identity, Cast, Unsqueeze, Squeeze, Reshape, Flatten: same elements in order


def _with_reader_sources(elements: list[Element], reader, exclusive: bool) -> list[Element]:
    """Known values computed from static dims (TorchScript's ``chunk`` bounds) have no stored
    constant; when the whole vector is known and holds no dim read by ``Shape``, the reader may
    take a constant instead (its own copy: other readers of the computation are unaffected)."""
    if reader is None or not all(e.known and e.symbol is None for e in elements):
        return elements  # a dim read at run time (a batch) must stay read at run time
    values = tuple(e.value for e in elements)
    return [e if e.source is not None else
            replace(e, source=Source(reader[0], reader[1], k, exclusive, values))
            for k, e in enumerate(elements)]


def _arithmetic(node: gs.Node, ctx, depth: int) -> list[Element] | None:
    """``Add``/``Sub``/``Div`` element by element: known where both sides are known (from static
    dims, e.g. TorchScript's ``chunk``: ``Div(Gather(Shape(x), 1), 2)``), and tainted by the
    channel counts they were computed from."""
    if len(node.inputs) != 2:
        return None
    a = _elements(node.inputs[0], ctx, None, False, depth)
    b = _elements(node.inputs[1], ctx, None, False, depth)
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    out = []
    for x, y in zip(a * (len(b) if len(a) == 1 else 1), b * (len(a) if len(b) == 1 else 1)):
        derived = x.channels if x.channels is not None else y.channels
        value = None
        if x.known and y.known:
            if node.op == "Add":
                value = x.value + y.value
            elif node.op == "Sub":
                value = x.value - y.value
            elif x.value >= 0 and y.value > 0:  # Div; integer division as ONNX defines it
                value = x.value // y.value
        out.append(Element(value, derived=derived))
    return out


def _filled(node: gs.Node, count: list[Element]) -> list[Element] | None:
    """``ConstantOfShape`` of a known length: that many copies of its integer value."""
    value = node.attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(
        value.values if hasattr(value, "values") else value)
    if len(count) != 1 or not count[0].known or not 0 <= count[0].value <= _MAX_ELEMENTS or \
            value.size != 1 or value.dtype.kind not in "iu":
        return None
    return [Element(int(value.reshape(-1)[0]), derived=count[0].channels)] * count[0].value


def _selected(node: gs.Node, ctx, input_elements, depth: int) -> list[Element] | None:
    """``Where(Equal(a, b), x, y)`` element by element where the equality is decided: both sides
    known, or a dim (never negative) against a negative constant (TorchScript's
    ``Where(Equal(s, -ones), ones, s)``). The picked element stays rewritable only when one side
    of the equality is negative: a rewritten count (>= 1) then leaves the condition as it was."""
    cond = node.inputs[0] if node.inputs else None
    equal = cond.inputs[0] if isinstance(cond, gs.Variable) and cond.inputs else None
    if equal is None or equal.op != "Equal" or (equal.domain or "") not in ("", "ai.onnx") or \
            len(node.inputs) != 3:
        return None
    parts = [_elements(t, ctx, None, False, depth) for t in equal.inputs[:2]]
    parts += [input_elements(1), input_elements(2)]
    if any(p is None for p in parts):
        return None
    n = max(len(p) for p in parts)
    if any(len(p) not in (1, n) for p in parts):
        return None
    out = []
    for a, b, x, y in zip(*(p * (n if len(p) == 1 else 1) for p in parts)):
        negative = (a.known and a.value < 0) or (b.known and b.value < 0)
        if a.channels is not None or b.channels is not None:
            decided = None  # the equality follows the plan: not decided here
        elif a.known and b.known:
            decided = a.value == b.value
        elif negative and (a.symbol is not None or b.symbol is not None):
            decided = False
        else:
            decided = None
        if decided is None:
            out.append(Element(derived=next((e.channels for e in (a, b, x, y)
                                             if e.channels is not None), None)))
            continue
        picked = x if decided else y
        out.append(picked if negative or picked.source is None else replace(picked, source=None))
    return out


def _product(a: list[Element], b: list[Element]) -> list[Element] | None:
    """Element-wise product (one side may be a single element): ``C * H * W`` stays a channel
    count times a static factor when H and W are static."""
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    out = []
    for x, y in zip(a * (len(b) if len(a) == 1 else 1), b * (len(a) if len(b) == 1 else 1)):
        read = _scaled_read(x, y) or _scaled_read(y, x)
        if x.labels is not None and y.known and y.channels is None:
            out.append(Element(symbol=None, labels=x.labels, factor=x.factor * y.value,
                               value=None if x.value is None else x.value * y.value, read=read))
        elif y.labels is not None and x.known and x.channels is None:
            out.append(Element(symbol=None, labels=y.labels, factor=y.factor * x.value,
                               value=None if y.value is None else x.value * y.value, read=read))
        elif x.known and y.known:
            derived = x.channels if x.channels is not None else y.channels
            out.append(Element(x.value * y.value, derived=derived,
                               source=_scaled_source(x, y) or _scaled_source(y, x), read=read))
        else:
            derived = x.channels if x.channels is not None else y.channels
            out.append(Element(derived=derived, read=read))
    return out


def _scaled_read(dim: Element, stored: Element) -> tuple[gs.Tensor, int, int] | None:
    """``dim * stored`` as a size read by Shape times a positive constant, else None."""
    if dim.read is None or stored.read is not None or not stored.known or stored.value < 1:
        return None
    return dim.read[0], dim.read[1], dim.read[2] * stored.value


def _scaled_source(dim: Element, stored: Element) -> Source | None:
    """``dim * stored`` is rewritable through ``stored`` when ``dim`` is a fixed dim read by
    ``Shape`` (static, not one of our channel counts: those carry labels, and split levels
    read by Shape stay whole)."""
    if dim.symbol is None or dim.channels is not None or dim.source is not None or \
            stored.source is None or stored.channels is not None or dim.value < 1:
        return None
    return replace(stored.source, scale=stored.source.scale * dim.value)


def _sliced(node: gs.Node, ctx, data: list[Element]) -> list[Element] | None:
    if "starts" in node.attrs:  # Slice-1
        bounds = [list(node.attrs["starts"]), list(node.attrs["ends"]),
                  list(node.attrs.get("axes", [0])), [1]]
    else:
        bounds = []
        for i, default in ((1, None), (2, None), (3, [0]), (4, [1])):
            if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name:
                value = ctx.const(node.inputs[i])
                if value is None:
                    return None
                bounds.append([int(v) for v in np.asarray(value).reshape(-1)])
            elif default is None:
                return None
            else:
                bounds.append(default)
    starts, ends, axes, steps = bounds
    if len(starts) != 1 or axes[0] not in (0, -1) or steps[0] == 0:
        return None
    return [data[i] for i in range(len(data))[slice(starts[0], ends[0], steps[0])]]


def _shape_of(node: gs.Node, ctx) -> list[Element] | None:
    tensor = node.inputs[0]
    dims = symbolic_dims(tensor)
    if dims is None:
        return None
    cmap = ctx.map(tensor)
    rank = len(dims)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = max(0, min(start + rank if start < 0 else start, rank))
    end = rank if end is None else max(0, min(int(end) + rank if end < 0 else int(end), rank))
    elements = []
    for axis in range(start, end):
        dim = dims[axis]
        labels = cmap.labels if cmap is not None and cmap.axis == axis else None
        value, symbol = (dim, str(dim)) if isinstance(dim, int) else (None, dim)
        elements.append(Element(value, symbol=symbol, labels=labels, read=(tensor, axis, 1)))
    return elements


def channel_labels(elements: list[Element]) -> np.ndarray | None:
    """All channel labels the elements carry or were computed from, or None."""
    carried = [e.channels for e in elements if e.channels is not None]
    return np.concatenate(carried) if carried else None


def rewritable_source(node: gs.Node, index: int, position: int, elements: list[Element],
                      ctx) -> Source | None:
    """Where element ``position`` of ``node.inputs[index]`` can be rewritten, if anywhere.

    The stored constant behind that one element when the path to ``node`` is exclusive;
    otherwise, when the whole vector is constant, the vector itself at ``node`` (replaced by a
    rewritten copy); otherwise the stored constant behind a path other shape vectors share
    (dynamo's ``Concat`` of one ``[2]`` for both repeat_kv Expands: the rewrite copies the path
    for ``node``); None when the element is computed.
    """
    element = elements[position]
    if element.source is not None and element.source.exclusive:
        return element.source
    if ctx.const(node.inputs[index]) is not None:
        return Source(node, index, position, True)
    if element.source is not None and element.source.target is not None:
        return element.source
    return None


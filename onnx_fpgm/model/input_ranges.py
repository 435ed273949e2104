"""Which values an integer graph input may take, read off what it indexes.

Random integers in a fixed range index past a small table: a BERT's ``token_type_ids`` feed a
2-row embedding, position ids a 512-row table, so onnxruntime refuses the run (or a Gather
clamps silently) and nothing can be verified or timed. Each integer (or bool) input is followed
forward through ops that carry its values (Cast, Unsqueeze, Reshape, Expand, Slice, Concat...,
and Add/Sub of a constant, which shift them) to the ops that use them as indices:

* ``Gather``/``GatherElements`` indices: below the data's size on the gather axis;
* ``GatherND`` indices: below the smallest indexed dim of the data;
* ``OneHot`` indices: below ``depth``;
* com.microsoft ``EmbedLayerNormalization``: ids, segment ids and positions below the rows of
  their embedding tables;
* ``Range``: a scalar that bounds a range is drawn positive.

An integer compared with constants (``Equal``; silero VAD's sample rate picks an If's branch
with ``sr == 16000``) keeps those values as *choices*: the oracle draws each of them, then a
value equal to none, one variant each (``variant_count``), so that every branch runs.

An input named like a mask (``mask`` in its name), or one that only reaches a mask pattern
(the condition of a ``Where``, ``1 - m``, a product after a cast to float), is drawn as 0/1
with ones first along its last axis (at least one 1 per row), as attention masks are; all ones
when its sums set a com.microsoft GroupQueryAttention's ``seqlens_k`` (onnxruntime-genai's
decoders: the kernel refuses a row whose count leaves out new tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .outer_scope import all_graphs

#: Integers that reach no known index or mask use are drawn from [0, DEFAULT_HIGH).
DEFAULT_HIGH = 4
#: A scalar that bounds a ``Range`` is drawn from [1, RANGE_HIGH).
RANGE_HIGH = 5
#: Ops through which an input's values pass unchanged (positions may move, values do not).
_CARRIERS = frozenset({"Cast", "CastLike", "Unsqueeze", "Squeeze", "Reshape", "Flatten",
                       "Expand", "Slice", "Identity", "Transpose", "Tile", "Concat", "Split",
                       "Gather", "GatherElements", "Max", "Min"})
#: Inputs of carriers that hold the values carried (the others are shapes, axes, indices).
_CARRIED_INPUT = {"Cast": {0}, "CastLike": {0}, "Unsqueeze": {0}, "Squeeze": {0},
                  "Reshape": {0}, "Flatten": {0}, "Expand": {0}, "Slice": {0}, "Identity": {0},
                  "Transpose": {0}, "Tile": {0}, "Split": {0}, "Gather": {0},
                  "GatherElements": {0}}
#: At most this many compared values of one input are drawn as choices.
MAX_CHOICES = 4
#: How far (in ops) an input is followed.
_MAX_HOPS = 24
#: GroupQueryAttention's ``seqlens_k`` input, and how far a mask is followed to it.
_SEQLENS_INPUT, _SEQLENS_HOPS = 5, 6
#: com.microsoft EmbedLayerNormalization: index input -> its table input.
_EMBED_TABLES = {0: 2, 1: 4, 8: 3}


@dataclass(frozen=True)
class IntegerRange:
    """How to draw one integer/bool input: from [low, high), or as a 0/1 mask, ones first."""

    low: int = 0
    high: int = DEFAULT_HIGH
    mask: bool = False
    indexes: str | None = None  # what bounds it, for messages ("Gather emb (2 rows)")
    #: Constants it is compared with (Equal): variant k < len draws choices[k] everywhere.
    choices: tuple[int, ...] = ()
    #: a mask drawn all ones (it sets GroupQueryAttention's sequence lengths)
    full: bool = False


def integer_ranges(model: onnx.ModelProto) -> dict[str, IntegerRange]:
    """An ``IntegerRange`` for every integer or bool real graph input of ``model``."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers and
              _is_integer(v.type.tensor_type.elem_type)]
    if not inputs:
        return {}
    walk = _Walk(graph, initializers)
    return {v.name: walk.range_of(v.name) for v in inputs}


def _is_integer(elem_type: int) -> bool:
    if not elem_type:
        return False
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return dtype.kind in "iub"


class _Walk:
    """Consumers, constants and static shapes of one graph, for following inputs."""

    def __init__(self, graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]):
        # readers inside control-flow bodies count too (an If branch comparing the input)
        graphs = list(all_graphs(graph))
        nodes = [node for g in graphs for node in g.node]
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in nodes:
            for k, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, k))
        self.constants: dict[str, onnx.TensorProto] = dict(initializers)
        for body in graphs[1:]:
            self.constants.update({t.name: t for t in body.initializer})
        for node in nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
        self.shapes: dict[str, list[int | None]] = {}
        for value in (*graph.input, *(v for g in graphs for v in g.value_info), *graph.output):
            ttype = value.type.tensor_type
            if ttype.HasField("shape"):
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                           for d in ttype.shape.dim]
        for name, tensor in self.constants.items():
            self.shapes[name] = list(tensor.dims)

    def range_of(self, name: str) -> IntegerRange:
        low, high, bound_by = 0, None, None
        mask_use = positive = False
        compared: set[int] = set()
        seen = set()
        frontier = [(name, 0, 0, False)]  # tensor, offset low, offset high, cast to float
        hops = 0
        while frontier and hops < _MAX_HOPS:
            hops += 1
            following = []
            for tensor, olo, ohi, floated in frontier:
                if (tensor, olo, ohi) in seen:
                    continue
                seen.add((tensor, olo, ohi))
                for node, k in self.consumers.get(tensor, ()):
                    bound = self._index_bound(node, k)
                    if bound is not None:
                        # value + offset in [0, bound): value in [-olo, bound - ohi)
                        low = max(low, -olo)
                        if high is None or bound - ohi < high:
                            high, bound_by = bound - ohi, _describe(node, bound)
                        continue
                    if node.op_type == "Range":
                        positive = True
                        continue
                    if node.op_type == "Equal" and olo == ohi == 0:
                        compared |= self._compared_with(node, k)
                        continue
                    if _is_mask_use(node, k, floated, self.constants):
                        mask_use = True
                        continue
                    shift = self._shift(node, k)
                    if shift is not None:
                        following += [(o, olo + shift[0], ohi + shift[1], floated)
                                      for o in node.output if o]
                    elif node.op_type in _CARRIERS and \
                            k in _CARRIED_INPUT.get(node.op_type, {k}):
                        now_float = floated or _casts_to_float(node)
                        following += [(o, olo, ohi, now_float) for o in node.output if o]
            frontier = following
        if high is not None:
            if high <= low:
                return IntegerRange(0, max(1, high), indexes=bound_by)
            return IntegerRange(low, high, indexes=bound_by,
                                choices=tuple(sorted(v for v in compared if low <= v < high)))
        if "mask" in name.lower() or mask_use:
            return IntegerRange(0, 2, mask=True, full=self._sets_sequence_lengths(name))
        if positive:
            return IntegerRange(1, RANGE_HIGH, choices=tuple(sorted(v for v in compared
                                                                     if v >= 1)))
        return IntegerRange(choices=tuple(sorted(compared)))

    def _sets_sequence_lengths(self, name: str) -> bool:
        """``name`` reaches input 5 (``seqlens_k``) of a GroupQueryAttention within a few ops
        (genai's ``Cast(Sub(ReduceSum(mask), 1))``)."""
        frontier, seen = [name], set()
        for _ in range(_SEQLENS_HOPS):
            following = []
            for tensor in frontier:
                for node, k in self.consumers.get(tensor, ()):
                    if node.op_type == "GroupQueryAttention" and k == _SEQLENS_INPUT:
                        return True
                    following += [o for o in node.output if o and o not in seen]
                    seen.update(node.output)
            frontier = following
        return False

    def _compared_with(self, node: onnx.NodeProto, k: int) -> set[int]:
        """The values of the constant ``node`` (an Equal) compares input ``k`` with (a few)."""
        if len(node.input) != 2:
            return set()
        other = self._value(node.input[1 - k])
        if other is None or other.dtype.kind not in "iub" or not 0 < other.size <= MAX_CHOICES:
            return set()
        return {int(v) for v in other.reshape(-1)}

    def _index_bound(self, node: onnx.NodeProto, k: int) -> int | None:
        """The exclusive bound of input ``k`` of ``node`` where it is an index, else None."""
        op = node.op_type
        if op in ("Gather", "GatherElements") and k == 1:
            axis = _int_attr(node, "axis", 0)
            dims = self.shapes.get(node.input[0])
            if dims and -len(dims) <= axis < len(dims):
                return dims[axis] or None
            return None
        if op == "GatherND" and k == 1:
            dims = self.shapes.get(node.input[0])
            batch = _int_attr(node, "batch_dims", 0)
            known = [d for d in (dims or [])[batch:] if d]
            return min(known) if known else None
        if op == "OneHot" and k == 0 and len(node.input) > 1:
            depth = self._value(node.input[1])
            return int(depth.reshape(-1)[0]) if depth is not None and depth.size else None
        if op == "EmbedLayerNormalization" and k in _EMBED_TABLES and \
                len(node.input) > _EMBED_TABLES[k]:
            dims = self.shapes.get(node.input[_EMBED_TABLES[k]])
            return dims[0] if dims and dims[0] else None
        return None

    def _shift(self, node: onnx.NodeProto, k: int) -> tuple[int, int] | None:
        """(low, high) added to the values by an Add/Sub of an integer constant, else None."""
        if node.op_type not in ("Add", "Sub") or len(node.input) != 2:
            return None
        other = self._value(node.input[1 - k])
        if other is None or other.dtype.kind not in "iu" or not other.size:
            return None
        if node.op_type == "Sub":
            if k != 0:
                return None  # c - x reverses the order: not followed
            other = -other.astype(np.int64)
        return int(other.min()), int(other.max())

    def _value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError):
            return None


def _is_mask_use(node: onnx.NodeProto, k: int, floated: bool,
                 constants: dict[str, onnx.TensorProto]) -> bool:
    """``Where``'s condition, ``1 - m``, or a product of a value cast to float."""
    if node.op_type == "Where":
        return k == 0
    if node.op_type == "Sub":
        return k == 1 and node.input[0] in constants
    if node.op_type == "Mul":
        return floated
    return False


def _casts_to_float(node: onnx.NodeProto) -> bool:
    if node.op_type != "Cast":
        return False
    to = _int_attr(node, "to", 0)
    return bool(to) and onnx.helper.tensor_dtype_to_np_dtype(to).kind == "f"


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _describe(node: onnx.NodeProto, bound: int) -> str:
    return f"{node.op_type} {node.name or node.output[0]} ({bound} rows)"


def variant_count(ranges: dict[str, IntegerRange]) -> int:
    """How many variants of random inputs run every value the integer inputs are compared with
    (each choice, then one equal to none); 1 when no input has choices."""
    return 1 + max((len(r.choices) for r in ranges.values()), default=0)


def draw_integers(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype,
                  spec: IntegerRange, variant: int | None = None) -> np.ndarray:
    """Seeded values of one integer/bool input as ``spec`` says. With ``variant`` and choices,
    variant k draws ``choices[k]`` everywhere, a later variant only values that are none of
    them (so that each branch an Equal picks runs once)."""
    dtype = np.dtype(dtype)
    if spec.mask:
        return (np.ones(shape, np.int64) if spec.full else _mask(rng, shape)).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    low, high = max(spec.low, int(info.min)), min(spec.high, int(info.max) + 1)
    if variant is not None and spec.choices:
        if variant < len(spec.choices):
            return np.full(shape, spec.choices[variant], dtype)
        others = [v for v in range(low, max(high, low + 1))[:len(spec.choices) + DEFAULT_HIGH]
                  if v not in spec.choices]
        if others:
            return rng.choice(np.array(others), shape).astype(dtype)
    return rng.integers(low, max(high, low + 1), shape).astype(dtype)


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """0/1 rows that start with ones (1 to all of the last axis), then zeros."""
    if not shape:
        return np.ones((), np.int64)
    length = shape[-1]
    rows = rng.integers(1, max(length, 0) + 1, shape[:-1]) if length else \
        np.zeros(shape[:-1], np.int64)
    return (np.arange(length) < rows[..., None]).astype(np.int64)

"""What handlers may do to the graph while a plan is applied.

Constants are sliced where they are stored (the initializer, or the ``Constant`` node behind an
``Identity``/``Cast`` chain), keeping their names, dtype and bytes of the kept entries. A constant
that another node also reads is never sliced in place: the pruned node gets its own copy
(copy-on-write), and the event is noted for the report; where every reader's copy ends up
the same, the copies go back into the original (``shared_weights``). A copy of a constant read
through a ``Cast`` is made in the stored dtype, with its own copy of the chain (an int8 or fp16
weight never becomes a float32 copy), named with the original's name as prefix.

A weight stored quantized (``DequantizeLinear(W_q, scale, zero_point)``, possibly over a
``QuantizeLinear`` of a float constant) is sliced through its quantizer: ``W_q`` along the pruned
axis, and per-axis scale/zero point too when their axis is the pruned one (per-tensor ones stay).
A quantizer that other nodes also read is duplicated for the pruned node first. A weight
dequantized by hand (``Mul(Cast(W_int8), scale)``, with a ``Sub`` of a zero point) is sliced the
same way through its elementwise ops (and so are a grouped conv's per-group input slices):
the stored integers keep their dtype.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import RewriteError
from ..model.outer_scope import with_bodies
from .blocks import SplitMap, split_keep, split_keeps
from .channels import Analysis, ChannelMap
from .constants import ConstantFolder, block_size, constant_node_value, quantizer_of, root_constant
from .context import AnalysisContext
from .shape_values import Source


#: Elementwise ops whose constant operands a sliced weight is pushed through (a dequantization).
_ELEMENTWISE = frozenset({"Mul", "Div", "Add", "Sub"})


class RewriteContext:
    """Keep masks for every mapped tensor, and safe constant edits."""

    def __init__(self, graph: gs.Graph, analysis: Analysis, removed_atoms: np.ndarray,
                 opset: int) -> None:
        self.graph = graph
        self.analysis = analysis
        self.opset = opset
        #: read by ``shape_values``: which shape values are computed from a channel count
        self.shape_maps = analysis.shape_maps
        self._removed = removed_atoms  # bool over atoms + 1 trailing False for label -1
        self._sources = {s.node for s in analysis.sources}
        self.consts = ConstantFolder(opset)
        self.notes: list[str] = []
        self._names = {t for g in with_bodies(graph) for t in g.tensors()} | \
            {n.name for g in with_bodies(graph) for n in g.nodes}
        #: Nodes added by the rewrite (private quantizer copies): the graph needs a toposort.
        self.added_nodes: list[gs.Node] = []
        #: Sliced copies of shared constants, by (root, chain, axis, kept): readers slicing a
        #: shared constant alike share one copy.
        self._sliced_copies: dict[tuple, gs.Constant] = {}
        #: (original, copy, index of its note) of every copy of a stored constant: put back
        #: into the original where all readers agree (``shared_weights.merge_alike_copies``).
        self.copies: list[tuple[gs.Constant, gs.Constant, int]] = []

    # ---- reading ----
    def map(self, tensor: gs.Tensor | None) -> ChannelMap | None:
        if tensor is None or not tensor.name:
            return None
        return self.analysis.maps.get(tensor.name)

    def split_map(self, tensor: gs.Tensor | None) -> SplitMap | None:
        if tensor is None or not tensor.name:
            return None
        return self.analysis.split_maps.get(tensor.name)

    def split_keep(self, tensor: gs.Tensor | None) -> tuple[int, np.ndarray] | None:
        """(tensor axis, kept indices) of a split tensor's free level when it shrinks."""
        smap = self.split_map(tensor)
        if smap is None:
            return None
        found = split_keep(self._removed, smap, self.analysis.split_free[smap.record])
        return None if found is None else (smap.axes[found[0]], found[1])

    def split_keeps(self, tensor: gs.Tensor | None) -> list[tuple[int, np.ndarray]]:
        """(tensor axis, kept indices) of every level of a split tensor that shrinks: the
        heads, and the head dims within them (``head_dims``)."""
        smap = self.split_map(tensor)
        if smap is None:
            return []
        try:
            found = split_keeps(self._removed, smap)
        except ValueError as err:
            raise RewriteError(f"{tensor.name}: {err}") from err
        return [(smap.axes[position], keep) for position, keep in found]

    def kept_mask(self, labels: np.ndarray) -> np.ndarray:
        return ~self._removed[labels]

    def keep(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """Kept positions on the tensor's channel axis; None if unmapped or nothing removed."""
        cmap = self.map(tensor)
        if cmap is None:
            return None
        mask = self.kept_mask(cmap.labels)
        if mask.all():
            return None
        return np.flatnonzero(mask).astype(np.int64)

    def is_source(self, node: gs.Node) -> bool:
        return node.name in self._sources

    @staticmethod
    def shape(tensor):
        return AnalysisContext.shape(tensor)

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        return self.consts.value(tensor)

    def _edited(self) -> None:
        """Values cached before an edit may be stale: start a fresh cache."""
        self.consts = ConstantFolder(self.opset)

    # ---- editing ----
    def slice_input(self, node: gs.Node, index: int, axis: int, keep: np.ndarray) -> None:
        """Keep only ``keep`` along ``axis`` of the constant feeding ``node.inputs[index]``."""
        tensor = node.inputs[index]
        quantizer = quantizer_of(tensor)
        if quantizer is not None:
            self._slice_quantized(node, index, quantizer, axis, keep)
            return
        found = root_constant(tensor)
        if found is not None:
            root, chain = found
            stored = _stored_value(root)
            if axis >= stored.ndim or stored.shape[axis] <= int(keep.max(initial=0)):
                raise RewriteError(f"cannot slice {tensor.name} of {node.name} on axis {axis}")
            sliced = np.take(stored, keep, axis=axis)
            if self._exclusive(root, chain, node):
                # A copy another reader may still be handed (sliced alike on this axis) is
                # now sliced further: it no longer stands for that slice alone.
                self._sliced_copies = {k: v for k, v in self._sliced_copies.items()
                                       if v is not root}
                _store_value(root, sliced)
                self._edited()
                return
            key = (id(root), tuple(id(c) for c in chain), axis, keep.tobytes())
            if key in self._sliced_copies:  # sliced alike by another reader (a Q/DQ pair's scale)
                node.inputs[index] = self._sliced_copies[key]
                return
            if any(c.op == "Cast" for c in chain):
                self._attach_chain_copy(node, index, root, chain, sliced)
            else:
                self._attach_copy(node, index, _through_chain(sliced, chain), "sliced copy",
                                  root if all(c.op == "Identity" for c in chain) else None)
            self._sliced_copies[key] = node.inputs[index]
            return
        if self._slice_elementwise(node, index, axis, keep):
            return
        value = self.const(tensor)
        if value is None:
            raise RewriteError(f"input {tensor.name} of {node.name} is not constant")
        value = np.take(value, keep, axis=axis)
        self._attach_copy(node, index, value, "sliced copy")

    def _slice_elementwise(self, node: gs.Node, index: int, axis: int,
                           keep: np.ndarray) -> bool:
        """Slice a weight computed elementwise from stored constants where they are stored.

        ``Mul(Cast(W_int8), scale)`` (a hand-dequantized weight), ``Mul(Sub(Cast(W_q), zp),
        scale)``: each operand that is not broadcast along ``axis`` is sliced (its integers keep
        their dtype, a per-channel scale is sliced with them), a broadcast one stays; the
        computed float weight is never written, so the file does not grow. False when the
        weight is not of that form (the caller writes a sliced copy of its folded value).
        """
        found = self._dequantization(node, index, axis)
        if found is None:
            return False
        producer, operands, _ = found
        producer = self.private_producer(node, index, producer)
        for k, own in operands:
            self.slice_input(producer, k, own, keep)
        return True

    def _dequantization(self, node: gs.Node, index: int, axis: int):
        """(elementwise producer of ``node.inputs[index]``, its operands that are not broadcast
        along ``axis`` as (input index, own axis), the weight's shape) when the weight is
        computed elementwise from two constants; else None."""
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        weight = self.const(tensor)
        if producer.op not in _ELEMENTWISE or producer.domain not in ("", "ai.onnx", None) or \
                len(producer.inputs) != 2 or weight is None:
            return None
        values = [self.const(t) for t in producer.inputs]
        if any(v is None for v in values):
            return None
        rank = max(v.ndim for v in values)
        if axis >= rank:
            return None
        operands = [(k, axis - (rank - v.ndim)) for k, v in enumerate(values)]
        operands = [(k, own) for k, own in operands if own >= 0 and values[k].shape[own] > 1]
        return producer, operands, weight.shape

    def _slice_quantized(self, node: gs.Node, index: int, quantizer: gs.Node, axis: int,
                         keep: np.ndarray) -> None:
        """Slice a quantized constant: its integers (or float source) and per-axis parameters."""
        quantizer = self.private_producer(node, index, quantizer)
        data = self.const(quantizer.inputs[0])
        scale = self.const(quantizer.inputs[1])
        if data is None or scale is None or block_size(quantizer):
            raise RewriteError(f"cannot slice the quantized input {index} of {node.name} "
                               f"through {quantizer.op} {quantizer.name}")
        q_axis = int(quantizer.attrs.get("axis", 1))
        q_axis = q_axis + data.ndim if q_axis < 0 else q_axis
        self.slice_input(quantizer, 0, axis, keep)
        if scale.size > 1 and q_axis == axis:  # per-axis along the pruned axis
            for param in (1, 2):
                if len(quantizer.inputs) > param and quantizer.inputs[param] is not None and \
                        quantizer.inputs[param].name:
                    self.slice_input(quantizer, param, 0, keep)

    def map_input(self, node: gs.Node, index: int, axis: int, transform) -> None:
        """Replace the constant at ``node.inputs[index]`` by ``transform(value)``, which only
        rearranges entries along ``axis`` (a grouped conv's input slices); quantized constants
        are transformed in their stored integers, per-axis parameters on other axes stay."""
        quantizer = quantizer_of(node.inputs[index])
        if quantizer is None:
            if not self._map_elementwise(node, index, axis, transform):
                self._map_stored(node, index, transform)
            return
        quantizer = self.private_producer(node, index, quantizer)
        data, scale = self.const(quantizer.inputs[0]), self.const(quantizer.inputs[1])
        q_axis = int(quantizer.attrs.get("axis", 1))
        if data is None or scale is None or (scale.size > 1 and q_axis % data.ndim == axis):
            raise RewriteError(f"cannot rewrite the quantized input {index} of {node.name}")
        self.map_input(quantizer, 0, axis, transform)

    def _map_elementwise(self, node: gs.Node, index: int, axis: int, transform) -> bool:
        """``map_input`` through a hand dequantization (see ``_slice_elementwise``): operands of
        the weight's full shape are transformed where stored, broadcast ones stay."""
        found = self._dequantization(node, index, axis)
        if found is None:
            return False
        producer, operands, shape = found
        if any(self.const(producer.inputs[k]).shape != shape for k, _ in operands):
            return False
        producer = self.private_producer(node, index, producer)
        for k, own in operands:
            self.map_input(producer, k, own, transform)
        return True

    def _map_stored(self, node: gs.Node, index: int, transform) -> None:
        """``transform`` a stored constant; behind a ``Cast`` it is transformed in its stored
        dtype (a private copy when shared), else ``set_input_value`` writes it."""
        found = root_constant(node.inputs[index])
        if found is None or not any(c.op == "Cast" for c in found[1]):
            self.set_input_value(node, index, transform(self.const(node.inputs[index])))
            return
        root, chain = found
        value = transform(_stored_value(root))
        if self._exclusive(root, chain, node):
            self._sliced_copies = {k: v for k, v in self._sliced_copies.items() if v is not root}
            _store_value(root, value)
            self._edited()
        else:
            self._attach_chain_copy(node, index, root, chain, value)

    def private_producer(self, node: gs.Node, index: int, quantizer: gs.Node) -> gs.Node:
        """``quantizer`` (the producer of ``node.inputs[index]``: a quantizer, an elementwise
        dequantization, a ``ConstantOfShape`` of padding) itself when only ``node`` reads its output, else a copy for ``node``."""
        out = quantizer.outputs[0]
        graph_outputs = {t.name for t in self.graph.outputs}
        if out.name not in graph_outputs and len(out.outputs) == 1 and \
                sum(1 for t in node.inputs if t is out) == 1:
            return quantizer
        copy_out = gs.Variable(self._unique(f"{out.name}__{node.name}"), dtype=out.dtype)
        copy = gs.Node(quantizer.op, self._unique(f"{quantizer.name}__{node.name}"),
                       dict(quantizer.attrs), list(quantizer.inputs), [copy_out],
                       domain=quantizer.domain)
        self.graph.nodes.append(copy)
        self.added_nodes.append(copy)
        node.inputs[index] = copy_out
        self.notes.append(f"{node.name}: {quantizer.name} is shared; used a private copy")
        return copy

    def gather_input(self, node: gs.Node, index: int, axis: int, keep: np.ndarray) -> None:
        """``node`` reads ``keep`` along ``axis`` of its computed input ``index`` (rotary's
        cos/sin, computed at run time, on the head dims kept) through a Gather of its own."""
        tensor = node.inputs[index]
        name = self._unique(f"{tensor.name}__{node.name}")
        out = gs.Variable(name, dtype=tensor.dtype)
        gather = gs.Node("Gather", self._unique(f"{node.name}__head_dims_{index}"),
                         {"axis": axis}, [tensor, gs.Constant(name + "_kept", keep)], [out])
        self.graph.nodes.append(gather)
        self.added_nodes.append(gather)
        node.inputs[index] = out

    def set_input_value(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        """Replace the constant at ``node.inputs[index]`` by ``value`` (same dtype)."""
        tensor = node.inputs[index]
        found = root_constant(tensor)
        if found is not None and not found[1]:
            root = found[0]
            if self._exclusive(root, [], node):
                _store_value(root, value.astype(_stored_value(root).dtype))
                self._edited()
                return
        self._attach_copy(node, index, value, "rewritten copy")

    def set_shape_element(self, source: Source | None, value: int) -> None:
        """Rewrite one element of a shape parameter where it is stored (see ``shape_values``).

        Only that element changes; the computed elements of the same vector stay computed. An
        element computed as a fixed dim times a stored constant stores ``value / scale``.
        """
        if source is None:
            raise RewriteError("a shape parameter to rewrite is computed at run time")
        if not source.exclusive and source.target is not None:
            source = self._private_path(source)
        tensor = source.node.inputs[source.index]
        stored = self.const(tensor)
        if stored is None and source.values is not None:  # computed from static dims
            stored = np.array(source.values, dtype=tensor.dtype or np.int64).reshape(
                () if tensor.shape is not None and len(tensor.shape) == 0 else -1)
        if stored is None:
            raise RewriteError(f"input {source.index} of {source.node.name} is not constant")
        if value % source.scale:
            raise RewriteError(f"{source.node.name}: {value} is not a multiple of the dim "
                               f"{source.scale} it is computed from")
        updated = np.array(stored, copy=True)
        updated.reshape(-1)[source.position] = value // source.scale
        self.set_input_value(source.node, source.index, updated)

    def _private_path(self, source: Source) -> Source:
        """Copy the nodes between a shared stored element and its shape parameter for the
        parameter's node alone, so that rewriting the element changes nothing else."""
        reader, index = source.target
        path = _path_between(source.node, reader.inputs[index], depth=0)
        if path is None:
            raise RewriteError(f"cannot follow the shape input {index} of {reader.name} back "
                               f"to {source.node.name}")
        copies: dict[int, gs.Tensor] = {}
        copied_source = source.node
        for node in path:
            outputs = [gs.Variable(self._unique(f"{o.name}__{reader.name}"), dtype=o.dtype,
                                   shape=o.shape) for o in node.outputs]
            copy = gs.Node(node.op, self._unique(f"{node.name}__{reader.name}"),
                           dict(node.attrs), [copies.get(id(t), t) for t in node.inputs],
                           outputs, domain=node.domain)
            copies.update({id(o): c for o, c in zip(node.outputs, outputs)})
            self.graph.nodes.append(copy)
            self.added_nodes.append(copy)
            if node is source.node:
                copied_source = copy
        reader.inputs[index] = copies[id(reader.inputs[index])]
        self.notes.append(f"{reader.name}: its shape input is shared; used a private copy")
        return replace(source, node=copied_source, exclusive=True, target=None)

    def add_input_value(self, node: gs.Node, value: np.ndarray, name: str) -> None:
        """Append a constant input (e.g. explicit split sizes)."""
        node.inputs.append(gs.Constant(self._unique(name), value))
        self._edited()

    def _attach_copy(self, node: gs.Node, index: int, value: np.ndarray, what: str,
                     origin=None) -> None:
        """``origin``: the stored constant that ``node.inputs[index]`` reads through
        ``Identity`` nodes (the input itself when it is one)."""
        old = node.inputs[index]
        copy = gs.Constant(self._unique(f"{old.name}__{node.name}"), _contiguous(value))
        node.inputs[index] = copy
        self._edited()
        origin = old if origin is None else origin
        if isinstance(origin, gs.Constant):
            self.copies.append((origin, copy, len(self.notes)))
        self.notes.append(f"{node.name}: {old.name} is shared or computed; used a {what}")

    def _attach_chain_copy(self, node: gs.Node, index: int, root, chain: list[gs.Node],
                           sliced: np.ndarray) -> None:
        """Give ``node`` a private copy of a shared constant read through a ``Cast`` chain:
        the sliced value in its stored dtype (int8 stays int8, fp16 stays fp16) and copies of
        the chain's nodes, so that the copy is no larger than the slice it stands for."""
        name = root.name if isinstance(root, gs.Constant) else root.outputs[0].name
        current: gs.Tensor = gs.Constant(self._unique(f"{name}__{node.name}"), _contiguous(sliced))
        for link in chain:
            out = link.outputs[0]
            copy_out = gs.Variable(self._unique(f"{out.name}__{node.name}"), dtype=out.dtype)
            copy = gs.Node(link.op, self._unique(f"{link.name}__{node.name}"), dict(link.attrs),
                           [current], [copy_out], domain=link.domain)
            self.graph.nodes.append(copy)
            self.added_nodes.append(copy)
            current = copy_out
        old = node.inputs[index]
        node.inputs[index] = current
        self._edited()
        self.notes.append(f"{node.name}: {old.name} is shared; used a sliced copy of {name} "
                          "in its stored dtype")

    def unique_name(self, name: str) -> str:
        """A tensor name not yet used in the graph, based on ``name``."""
        return self._unique(name)

    def _unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self._names:
            candidate, k = f"{name}_{k}", k + 1
        self._names.add(candidate)
        return candidate

    def _exclusive(self, root, chain: list[gs.Node], node: gs.Node) -> bool:
        """True when the stored constant feeds only ``node`` (through ``chain``), once."""
        graph_outputs = {t.name for t in self.graph.outputs}
        tensors = [root if isinstance(root, gs.Constant) else root.outputs[0]]
        tensors += [c.outputs[0] for c in chain]
        consumers = [*chain, node]
        for tensor, consumer in zip(tensors, consumers):
            if tensor.name in graph_outputs or len(tensor.outputs) != 1 or \
                    tensor.outputs[0] is not consumer:
                return False
            if sum(1 for t in consumer.inputs if t is tensor) != 1:
                return False
        return True


def _stored_value(root) -> np.ndarray:
    if isinstance(root, gs.Constant):
        return np.asarray(root.values)

    return constant_node_value(root)


def _contiguous(value: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d scalars 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return np.asarray(value, order="C") if np.ndim(value) else np.array(value)


def _store_value(root, value: np.ndarray) -> None:
    value = _contiguous(value)
    if isinstance(root, gs.Constant):
        root.values = value
        return
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        root.attrs.pop(key, None)
    old = root.attrs.get("value")
    root.attrs["value"] = gs.Constant(old.name if isinstance(old, gs.Constant) else "", value)


def _through_chain(value: np.ndarray, chain: list[gs.Node]) -> np.ndarray:
    for node in chain:
        if node.op == "Cast":
            value = value.astype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    return value


def _path_between(start: gs.Node, tensor: gs.Tensor, depth: int) -> list[gs.Node] | None:
    """The nodes from ``start`` to the producer of ``tensor``, in order (None: no such path)."""
    if depth > 32 or not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer is start:
        return [producer]
    for inp in producer.inputs:
        found = _path_between(start, inp, depth + 1)
        if found is not None:
            return [*found, producer]
    return None

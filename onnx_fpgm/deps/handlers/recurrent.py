"""LSTM, GRU and RNN: consumers of pruned input features and producers of hidden units.

Channel algebra (``layout`` 0: X is (seq, batch, input); 1: (batch, seq, input)):

* Every gate reads ``X_t @ W[d]^T``, with ``W`` of shape (directions, gates * hidden, input):
  input feature i is consumed by ``W[:, :, i]`` and by nothing else (the recurrence ``R`` and
  the biases act on the hidden state). Removing feature i slices ``W`` on axis 2, which is
  exactly the original with ``W[:, :, i]`` zeroed (the oracle's consumer rule).
* Hidden unit h is one atom across gates and directions (``hidden_size`` is shared): its rows
  ``g * hidden + h`` of ``W``, ``R`` and the biases, its peepholes, its initial states. It is
  consumed inside the layer by ``R[:, :, h]`` (every unit's gates read the previous hidden
  state), and outside by whatever reads ``Y`` (axis 3), ``Y_h`` and ``Y_c`` (axis 2), in both
  layouts. Removing unit h slices all of these alike; the rest of the layer computes exactly
  what it computed with ``R[:, :, h]`` zeroed, and the readers of the outputs ignore h (the
  oracle zeroes both). An initial state is a stored constant (sliced) or the zeros PyTorch
  writes, ``ConstantOfShape(Concat(dirs, batch, hidden))`` (its stored ``hidden`` element is
  rewritten). The units stay whole when a weight or an initial state is anything else (a
  streaming model's state inputs are its interface).
* Channels that reach X on another axis (time or batch), a computed ``W``, or channels on any
  other input (initial states, sequence lengths) block, with the reason named.
"""
from __future__ import annotations

import numpy as np

from ..channels import ChannelMap
from ..constants import weight_reason
from ..op_families import FEATURE_AXIS, RECURRENT_GATES, RECURRENT_OPS
from ..registry import register
from ..shape_values import rewritable_source, shape_elements
from ._util import has_input

#: Input positions: W, R, B, sequence_lens, initial_h, initial_c, P (LSTM's peepholes).
W, R, B, INITIAL_H, INITIAL_C, PEEPHOLES = 1, 2, 3, 5, 6, 7
#: Axis of the hidden units in Y (seq, dirs, batch, hidden), Y_h and Y_c (dirs, batch, hidden);
#: layout 1 moves batch first and keeps hidden last: the same axes.
HIDDEN_AXES = (3, 2, 2)
#: Inputs besides W and R that lose the removed units' entries (and must be stored for that).
SLICED_WITH_UNITS = (B, INITIAL_H, INITIAL_C, PEEPHOLES)


def _input(node, index: int):
    return node.inputs[index] if has_input(node, index) else None


def hidden_output_map(outputs, maps) -> ChannelMap | None:
    """The hidden-unit map of a recurrent node, read off its first mapped output: ``outputs``
    are its output names (a NodeProto's) or tensors (a graph-surgeon node's); ``maps`` is tensor
    name -> channel map, as the analysis records them."""
    for output in outputs:
        name = getattr(output, "name", output)
        if name and name in maps:
            return maps[name]
    return None


def hidden_unit_rows(op: str, weight: np.ndarray, recurrence: np.ndarray,
                     bias: np.ndarray | None) -> np.ndarray:
    """One row per hidden unit: its rows of W, R and B over every gate and direction (the
    filter FPGM scores)."""
    gates = RECURRENT_GATES[op]
    dirs, _, _ = weight.shape
    hidden = recurrence.shape[2]
    parts = [weight.reshape(dirs, gates, hidden, -1).transpose(2, 0, 1, 3).reshape(hidden, -1),
             recurrence.reshape(dirs, gates, hidden, -1).transpose(2, 0, 1, 3).reshape(hidden, -1)]
    if bias is not None:
        parts.append(bias.reshape(dirs, 2 * gates, hidden).transpose(2, 0, 1).reshape(hidden, -1))
    return np.concatenate(parts, axis=1)


def zero_state_shape(tensor, hidden: int, ctx):
    """Where the hidden size of a zero initial state ``ConstantOfShape(shape)`` is stored (a
    ``shape_values.Source``), or None when the state is not such zeros."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "ConstantOfShape" or len(tensor.outputs) != 1:
        return None
    value = producer.attrs.get("value")
    if value is not None and np.any(np.asarray(getattr(value, "values", value))):
        return None
    elements = shape_elements(producer, 0, ctx)
    if elements is None or len(elements) != 3 or elements[2].value != hidden:
        return None
    return rewritable_source(producer, 0, 2, elements, ctx)


@register(*RECURRENT_OPS)
class RecurrentHandler:
    """Consumer of its input features, producer of its hidden units (see module docstring)."""

    def propagate(self, node, ctx) -> None:
        self._input_features(node, ctx)
        self._hidden_units(node, ctx)

    def _input_features(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        for tensor in node.inputs[1:]:
            if tensor is not None and tensor.name and ctx.map(tensor) is not None:
                ctx.block(ctx.map(tensor), f"channels reach recurrent layer {node.op} "
                                           f"{node.name} on {tensor.name}, not on its input "
                                           "sequence")
        if xmap is None:
            return
        weight = ctx.const(node.inputs[W]) if len(node.inputs) > W else None
        shape = ctx.shape(node.inputs[0])
        if weight is None or weight.ndim != 3 or ctx.map(node.inputs[W]) is not None:
            ctx.block(xmap, f"input weight W of {node.op} {node.name} is not a stored 3-D "
                            f"constant{weight_reason(node.inputs[W])}")
        elif shape is None or len(shape) != 3 or xmap.axis != FEATURE_AXIS:
            ctx.block(xmap, f"channels reach recurrent layer {node.op} {node.name} on axis "
                            f"{xmap.axis}, not on its input features (axis 2 of a 3-D sequence)")
        elif weight.shape[FEATURE_AXIS] != len(xmap.labels):
            ctx.block(xmap, f"recurrent layer {node.op} {node.name} reads "
                            f"{weight.shape[FEATURE_AXIS]} input features, {len(xmap.labels)} "
                            "channels reach it")

    def _hidden_units(self, node, ctx) -> None:
        """Create the hidden-unit atoms when every tensor sliced with them is a constant."""
        outputs = [(t, axis) for t, axis in zip(node.outputs, HIDDEN_AXES)
                   if t is not None and t.name]
        weight, recurrence = (ctx.const(_input(node, i)) if _input(node, i) else None
                              for i in (W, R))
        if not outputs or weight is None or recurrence is None or weight.ndim != 3 \
                or recurrence.ndim != 3:
            return
        gates, hidden = RECURRENT_GATES[node.op], recurrence.shape[2]
        if weight.shape[1] != gates * hidden or recurrence.shape[1] != gates * hidden:
            return
        for index in SLICED_WITH_UNITS:
            tensor = _input(node, index)
            stored = tensor is None or (ctx.const(tensor) is not None and ctx.map(tensor) is None)
            zeros = index in (INITIAL_H, INITIAL_C) and tensor is not None and \
                zero_state_shape(tensor, hidden, ctx) is not None
            if not stored and not zeros:
                # a computed bias, or initial states the caller gives: the units stay whole
                ctx.blocked_tensors.append(
                    (outputs[0][0].name, f"hidden units of recurrent layer {node.op} "
                                         f"{node.name} stay whole: {tensor.name} is not a "
                                         "stored constant"))
                return
        bias = ctx.const(_input(node, B)) if _input(node, B) else None
        atoms = ctx.new_source(node, hidden_unit_rows(node.op, weight, recurrence, bias))
        for tensor, axis in outputs:
            ctx.set_map(tensor, ChannelMap(axis, atoms))

    def apply(self, node, ctx) -> None:
        keep_in = ctx.keep(node.inputs[0])
        if keep_in is not None:
            ctx.slice_input(node, W, FEATURE_AXIS, keep_in)
        cmap = next((ctx.map(t) for t in node.outputs if ctx.map(t) is not None), None)
        if cmap is None:
            return
        mask = ctx.kept_mask(cmap.labels)
        if mask.all():
            return
        keep = np.flatnonzero(mask).astype(np.int64)
        hidden = len(mask)

        def rows(blocks: int) -> np.ndarray:
            return np.concatenate([block * hidden + keep for block in range(blocks)])

        gates = RECURRENT_GATES[node.op]
        ctx.slice_input(node, W, 1, rows(gates))
        ctx.slice_input(node, R, 1, rows(gates))
        ctx.slice_input(node, R, 2, keep)
        for index, axis, blocks in ((B, 1, 2 * gates), (INITIAL_H, 2, 1), (INITIAL_C, 2, 1),
                                    (PEEPHOLES, 1, 3)):
            tensor = _input(node, index)
            if tensor is None:
                continue
            zeros = zero_state_shape(tensor, hidden, ctx) if index in (INITIAL_H, INITIAL_C) \
                and ctx.const(tensor) is None else None
            if zeros is not None:
                ctx.set_shape_element(zeros, len(keep))
            else:
                ctx.slice_input(node, index, axis, rows(blocks))
        node.attrs["hidden_size"] = len(keep)

"""LSTM, GRU and RNN as consumers of pruned channels: the CRNN and audio front-end form.

Channel algebra (``layout`` 0: X is (seq, batch, input); 1: (batch, seq, input)):

* Every gate reads ``X_t @ W[d]^T``, with ``W`` of shape (directions, gates * hidden, input):
  input feature i is consumed by ``W[:, :, i]`` and by nothing else (the recurrence ``R`` and
  the biases act on the hidden state). Removing feature i slices ``W`` on axis 2, which is
  exactly the original with ``W[:, :, i]`` zeroed (the oracle's consumer rule).
* The hidden units are not pruned: ``Y``, ``Y_h`` and ``Y_c`` carry no channel map, so what
  reads them sees fixed channels. Pruning hidden units would couple ``W``, ``R``, ``B``, ``P``,
  the initial states and every reader of the states; it is left for later.
* Channels that reach X on another axis (time or batch), a computed ``W``, or channels on any
  other input (initial states, sequence lengths) block, with the reason named.
"""
from __future__ import annotations

from ..constants import weight_reason
from ..op_families import FEATURE_AXIS, RECURRENT_OPS
from ..registry import register


@register(*RECURRENT_OPS)
class RecurrentHandler:
    """Consumer of its input features; its hidden units stay fixed (see module docstring)."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        for tensor in node.inputs[1:]:
            if tensor is not None and tensor.name and ctx.map(tensor) is not None:
                ctx.block(ctx.map(tensor), f"channels reach recurrent layer {node.op} "
                                           f"{node.name} on {tensor.name}, not on its input "
                                           "sequence")
        if xmap is None:
            return
        weight = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
        shape = ctx.shape(node.inputs[0])
        if weight is None or weight.ndim != 3 or ctx.map(node.inputs[1]) is not None:
            ctx.block(xmap, f"input weight W of {node.op} {node.name} is not a stored 3-D "
                            f"constant{weight_reason(node.inputs[1])}")
        elif shape is None or len(shape) != 3 or xmap.axis != FEATURE_AXIS:
            ctx.block(xmap, f"channels reach recurrent layer {node.op} {node.name} on axis "
                            f"{xmap.axis}, not on its input features (axis 2 of a 3-D sequence)")
        elif weight.shape[FEATURE_AXIS] != len(xmap.labels):
            ctx.block(xmap, f"recurrent layer {node.op} {node.name} reads "
                            f"{weight.shape[FEATURE_AXIS]} input features, {len(xmap.labels)} "
                            "channels reach it")

    def apply(self, node, ctx) -> None:
        keep_in = ctx.keep(node.inputs[0])
        if keep_in is not None:
            ctx.slice_input(node, 1, FEATURE_AXIS, keep_in)

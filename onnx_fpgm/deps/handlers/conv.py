"""Conv and ConvTranspose: the filters we prune, and consumers of pruned channels.

Channel algebra (NCHW, ``g`` = the ``group`` attribute):

* Conv, g == 1: ``W[o, i, k...]``. Output channel o is filter ``W[o]`` (a new atom, plus
  ``B[o]``); input channel i is consumed by ``W[:, i]``. Removing output o slices ``W`` and ``B`` on
  axis 0; removing input i slices ``W`` on axis 1.
* Depthwise Conv (g == C_in == C_out, ``W[c, 1, k...]``): channel c passes straight through and
  its filter ``W[c]`` joins channel c's group; removal slices ``W``/``B`` on axis 0 and sets g.
* ConvTranspose, g == 1: ``W[i, o, k...]`` (input channels first); output channel o is the
  filter ``W[:, o]``.
* A weight (or bias) given as ``DequantizeLinear`` of stored integers is the same filter: it is
  scored dequantized and sliced where stored (``RewriteContext.slice_input``).
* Other grouped convs are blocked: their channel counts must stay divisible by g.
"""
from __future__ import annotations

import numpy as np

from ...errors import RewriteError
from ..channels import ChannelMap
from ..constants import weight_reason
from ..registry import register
from ._util import has_input, split_parts


def _weight_or_block(node, ctx, w: int = 1, b: int = 2, weight=None):
    if weight is None:
        weight = ctx.const(node.inputs[w]) if len(node.inputs) > w else None
    if weight is None or weight.ndim < 2:
        reason = f"weight of {node.name} is not a stored constant"
        detail = weight_reason(node.inputs[w]) if len(node.inputs) > w else ""
        if detail:
            reason += f"{detail}; layer not pruned"
        ctx.block_inputs(node, reason)
        ctx.blocked_tensors.append((node.outputs[0].name, reason))
        return None
    if has_input(node, b) and ctx.const(node.inputs[b]) is None:
        ctx.block_inputs(node, f"bias of {node.name} is not a stored constant")
        return None
    return weight


def _input_map(node, ctx):
    xmap = ctx.map(node.inputs[0])
    if xmap is not None and xmap.axis != 1:
        ctx.block(xmap, f"channels reach {node.op} {node.name} on axis {xmap.axis}, not 1")
        return None
    return xmap


@register("Conv")
class ConvHandler:
    """Conv: producer of filters, consumer of input channels (see module docstring)."""

    #: Input indices of the weight and the bias (QLinearConv has its own).
    WEIGHT, BIAS = 1, 2

    def weight(self, node, ctx):
        """The float filters to score (QLinearConv: dequantized)."""
        return ctx.const(node.inputs[self.WEIGHT]) if len(node.inputs) > self.WEIGHT else None

    def propagate(self, node, ctx) -> None:
        weight = _weight_or_block(node, ctx, self.WEIGHT, self.BIAS,
                                  weight=self.weight(node, ctx))
        if weight is None:
            return
        xmap = _input_map(node, ctx)
        conv_group = int(node.attrs.get("group", 1))
        c_out, c_in_per_group = weight.shape[:2]
        y = node.outputs[0]
        if conv_group == 1:
            atoms = ctx.new_source(node, weight)
            ctx.set_map(y, ChannelMap(1, atoms, fold_member=len(ctx.members) - 1))
        elif conv_group == c_out and c_in_per_group == 1 and xmap is not None \
                and len(xmap.labels) == conv_group:
            member = ctx.add_member(node, xmap.labels, weight, creates=False)
            ctx.set_map(y, ChannelMap(1, xmap.labels, fold_member=member))
        elif c_in_per_group == 1:
            if xmap is not None:
                ctx.block(xmap, f"grouped conv {node.name} (channel multiplier "
                                f"{c_out // conv_group}) is not pruned")
        else:
            self._propagate_grouped(node, ctx, weight, xmap, conv_group)

    @staticmethod
    def _propagate_grouped(node, ctx, weight, xmap, conv_group: int) -> None:
        """Grouped conv: every group must keep the same number of inputs and of outputs.

        Input and output channels are cut at group boundaries (each block its own part, pruned
        at the same sparsity) and the blocks are registered as balanced; a plan that leaves
        unequal blocks freezes them.
        """
        c_out, c_in_per_group = weight.shape[:2]
        if xmap is not None:
            if len(xmap.labels) != conv_group * c_in_per_group:
                ctx.block(xmap, f"grouped conv {node.name} reads an unexpected channel count")
            else:
                blocks = split_parts(ctx, xmap, [c_in_per_group] * conv_group)
                ctx.balance([b.labels for b in blocks], f"input of grouped conv {node.name}")
        atoms = ctx.new_source(node, weight)
        out_map = ChannelMap(1, atoms, fold_member=len(ctx.members) - 1)
        blocks = split_parts(ctx, out_map, [c_out // conv_group] * conv_group)
        ctx.balance([b.labels for b in blocks], f"output of grouped conv {node.name}")
        ctx.set_map(node.outputs[0], out_map)

    def apply(self, node, ctx) -> None:
        w, b = self.WEIGHT, self.BIAS
        conv_group = int(node.attrs.get("group", 1))
        weight_shape = ctx.const(node.inputs[w]).shape
        depthwise = conv_group > 1 and weight_shape[1] == 1 and weight_shape[0] == conv_group
        keep_out = ctx.keep(node.outputs[0])
        keep_in = ctx.keep(node.inputs[0])
        if conv_group == 1 and keep_in is not None:
            ctx.slice_input(node, w, 1, keep_in)
        elif not depthwise and keep_in is not None:
            ctx.map_input(node, w, 1, lambda value: _grouped_input_slice(
                value, keep_in, conv_group, node.name))
        if keep_out is not None:
            ctx.slice_input(node, w, 0, keep_out)
            if has_input(node, b):
                ctx.slice_input(node, b, 0, keep_out)
            self.slice_filter_parameters(node, ctx, keep_out)
            if depthwise:
                node.attrs["group"] = len(keep_out)

    def slice_filter_parameters(self, node, ctx, keep_out) -> None:
        """Per-filter parameters besides weight and bias (QLinearConv's w_scale/w_zero_point)."""


def _grouped_input_slice(weight: np.ndarray, keep_in: np.ndarray, conv_group: int,
                         name: str) -> np.ndarray:
    """``W[o, i_local]`` of a grouped conv keeps, per output o of group j, group j's inputs."""
    per_group = weight.shape[1]
    local = [keep_in[(keep_in >= j * per_group) & (keep_in < (j + 1) * per_group)] - j * per_group
             for j in range(conv_group)]
    if len({len(lo) for lo in local}) != 1:
        raise RewriteError(f"grouped conv {name}: groups keep different input counts")
    index = np.repeat(np.stack(local), weight.shape[0] // conv_group, axis=0)
    index = index.reshape(*index.shape, *([1] * (weight.ndim - 2)))
    return np.take_along_axis(weight, index, axis=1)


@register("ConvTranspose")
class ConvTransposeHandler:
    """ConvTranspose: ``W[i, o/g, k...]``; producer (axis 1) and consumer (axis 0)."""

    def propagate(self, node, ctx) -> None:
        weight = _weight_or_block(node, ctx)
        if weight is None:
            return
        xmap = _input_map(node, ctx)
        conv_group = int(node.attrs.get("group", 1))
        y = node.outputs[0]
        if conv_group == 1:
            rows = np.swapaxes(weight, 0, 1)
            atoms = ctx.new_source(node, rows)
            ctx.set_map(y, ChannelMap(1, atoms, fold_member=len(ctx.members) - 1))
        elif weight.shape[1] == 1 and xmap is not None and len(xmap.labels) == conv_group \
                and weight.shape[0] == conv_group:
            member = ctx.add_member(node, xmap.labels, weight, creates=False)
            ctx.set_map(y, ChannelMap(1, xmap.labels, fold_member=member))
        elif xmap is not None:
            ctx.block(xmap, f"grouped ConvTranspose {node.name} (group={conv_group}) is not pruned")

    def apply(self, node, ctx) -> None:
        conv_group = int(node.attrs.get("group", 1))
        keep_out = ctx.keep(node.outputs[0])
        if conv_group == 1:
            keep_in = ctx.keep(node.inputs[0])
            if keep_in is not None:
                ctx.slice_input(node, 1, 0, keep_in)
            if keep_out is not None:
                ctx.slice_input(node, 1, 1, keep_out)
        elif keep_out is not None:
            ctx.slice_input(node, 1, 0, keep_out)
            node.attrs["group"] = len(keep_out)
        if keep_out is not None and has_input(node, 2):
            ctx.slice_input(node, 2, 0, keep_out)

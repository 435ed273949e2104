"""Gemm and MatMul with a constant weight: MLP layers and classifier heads.

Channel algebra:

* Gemm ``Y = A' B' + C`` (A' = A or A^T, B' = B or B^T, B' of shape (K, N)): input feature k of
  A (axis 1, transA = 0) is consumed by row k of B'; output feature n is the filter ``B'[:, n]``
  (a new atom) plus ``C[..., n]``.
* MatMul ``Y = A @ W`` with a constant 2-D ``W`` (K, N): when A's channels are on its last axis,
  feature k is consumed by ``W[k]`` and output feature n is ``W[:, n]``; when A's channels sit on
  an earlier axis they pass through unchanged (the product acts on the last axis only).
* An output projection reading merged attention heads also scores them: its input rows join
  the heads' joint space (a member that creates nothing).
* A MatMul with a stored weight whose input rank is unknown is still a layer: its output
  features are counted (coverage) and blocked with that reason.
* MatMul of two activations (attention): see ``split_operands.matmul_activations`` (heads paired on
  batch axes, head_dim contracted whole; plain channels contracted between activations block).
"""
from __future__ import annotations

import numpy as np

from ..channels import ChannelMap
from ..constants import weight_reason
from ..registry import register
from . import split_operands
from ._util import has_input


def score_heads_with(node, ctx, amap, kn: np.ndarray) -> None:
    """An output projection reading attention heads: its input rows (one per head channel)
    join the heads' joint FPGM space, as a member that creates no channel."""
    if amap is not None and amap.heads and len(amap.labels) == kn.shape[0]:
        ctx.add_member(node, amap.labels, kn, creates=False)


@register("Gemm")
class GemmHandler:
    """Gemm: producer of output features, consumer of input features."""

    #: Input indices of the weight and the bias (com.microsoft QGemm has its own).
    WEIGHT, BIAS = 1, 2

    def weight(self, node, ctx):
        """The float weight to score (QGemm: dequantized)."""
        return ctx.const(node.inputs[self.WEIGHT])

    def propagate(self, node, ctx) -> None:
        amap = ctx.map(node.inputs[0])
        weight = self.weight(node, ctx)
        if ctx.map(node.inputs[self.WEIGHT]) is not None or weight is None or weight.ndim != 2:
            ctx.block_inputs(node, f"weight of {node.op} {node.name} is not a stored 2-D "
                                   f"constant{weight_reason(node.inputs[self.WEIGHT])}")
            return
        if has_input(node, self.BIAS) and ctx.const(node.inputs[self.BIAS]) is None:
            ctx.block_inputs(node, f"bias of {node.op} {node.name} is not a stored constant")
            return
        if amap is not None and (int(node.attrs.get("transA", 0)) or amap.axis != 1):
            ctx.block(amap, f"features reach {node.op} {node.name} transposed")
        kn = weight.T if int(node.attrs.get("transB", 0)) else weight
        score_heads_with(node, ctx, amap, kn)
        atoms = ctx.new_source(node, kn.T)
        ctx.set_map(node.outputs[0], ChannelMap(1, atoms, fold_member=len(ctx.members) - 1))

    def apply(self, node, ctx) -> None:
        w, b = self.WEIGHT, self.BIAS
        trans_b = int(node.attrs.get("transB", 0))
        keep_in = ctx.keep(node.inputs[0])
        if keep_in is not None:
            ctx.slice_input(node, w, 1 if trans_b else 0, keep_in)
        keep_out = ctx.keep(node.outputs[0])
        if keep_out is None:
            return
        ctx.slice_input(node, w, 0 if trans_b else 1, keep_out)
        self.slice_output_parameters(node, ctx, keep_out)
        if has_input(node, b):
            bias = ctx.const(node.inputs[b])
            n_out = len(ctx.map(node.outputs[0]).labels)
            if bias.ndim >= 1 and bias.shape[-1] == n_out and n_out > 1:
                ctx.slice_input(node, b, bias.ndim - 1, keep_out)

    def slice_output_parameters(self, node, ctx, keep_out) -> None:
        """Per-output parameters besides weight and bias (QGemm's per-column b_scale)."""


@register("MatMul")
class MatMulHandler:
    """MatMul: see module docstring."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        a, b = node.inputs[0], node.inputs[1]
        amap, bmap = ctx.map(a), ctx.map(b)
        if ctx.split_map(a) is not None or ctx.split_map(b) is not None or (
                ctx.const(a) is None and ctx.const(b) is None):
            split_operands.matmul_activations(node, ctx)
            return
        weight = ctx.const(b) if bmap is None else None
        a_rank = len(ctx.shape(a)) if ctx.shape(a) is not None else None
        if weight is None or weight.ndim != 2 or a_rank is None or a_rank < 2:
            reason = f"MatMul {node.name} has no constant 2-D weight{weight_reason(b)}" \
                if weight is None or weight.ndim != 2 else \
                f"MatMul {node.name}: the rank of its input {a.name} is unknown"
            ctx.block_inputs(node, reason)
            if weight is not None and weight.ndim == 2:  # a layer all the same: counted, named
                ctx.block(ctx.new_source(node, weight.T), reason)
                ctx.blocked_tensors.append((node.outputs[0].name, reason))
            return
        y = node.outputs[0]
        if amap is not None and amap.axis < a_rank - 1:
            ctx.set_map(y, amap.passed())  # channels ride along; our output features stay fixed
            return
        score_heads_with(node, ctx, amap, weight)
        atoms = ctx.new_source(node, weight.T)
        ctx.set_map(y, ChannelMap(a_rank - 1, atoms, fold_member=len(ctx.members) - 1))

    def apply(self, node, ctx) -> None:
        if not ctx.is_source(node):
            return
        keep_in = ctx.keep(node.inputs[0])
        if keep_in is not None:
            ctx.slice_input(node, 1, 0, keep_in)
        keep_out = ctx.keep(node.outputs[0])
        if keep_out is not None:
            ctx.slice_input(node, 1, 1, keep_out)

"""Normalisations.

* BatchNormalization / InstanceNormalization: per-channel affine (and, for InstanceNorm,
  per-channel statistics): channel c depends only on channel c, so channels pass through and the
  parameters are sliced on axis 0. BatchNorm's scale ``gamma / sqrt(var + eps)`` is folded
  virtually into the producing filters so that folded and unfolded exports score alike.
* LayerNormalization normalises over the axes from ``axis`` on: channels on those axes are
  blocked (removing one changes the mean and variance of the rest); channels elsewhere pass.
  RMSNorm alike: ONNX ``RMSNormalization`` (opset 23), onnxruntime's
  ``SimplifiedLayerNormalization`` (default domain) and com.microsoft
  ``SkipLayerNormalization``/``SkipSimplifiedLayerNormalization`` (the residual sum and its norm
  in one op). The residual stays whole; the layers around it (heads, MLP widths) prune.
  com.microsoft ``EmbedLayerNormalization`` (BERT's embeddings, summed and normalised) writes
  that residual: nothing of ours passes it.
* GroupNormalization, LpNormalization and LRN mix channels: blocked.
"""
from __future__ import annotations

import numpy as np

from ..registry import register
from ._util import mapped_input, normalize_axis, record_shape


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNormHandler:
    """Channel c -> channel c, with per-channel parameters on inputs 1..n."""

    def propagate(self, node, ctx) -> None:
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            return
        if xmap.axis != 1:
            ctx.block(xmap, f"channels reach {node.op} {node.name} on axis {xmap.axis}, not 1")
            return
        params = [ctx.const(t) for t in node.inputs[1:]]
        if any(p is None for p in params):
            ctx.block(xmap, f"parameters of {node.op} {node.name} are not stored constants")
            return
        if node.op == "BatchNormalization":
            for extra in node.outputs[1:]:
                if extra.outputs:
                    ctx.block(xmap, f"training-mode outputs of {node.name} are used")
                    return
            scale, _, _, var = (np.asarray(p, dtype=np.float64) for p in params[:4])
            eps = float(node.attrs.get("epsilon", 1e-5))
            ctx.scale_member(xmap, scale / np.sqrt(var + eps))
            ctx.set_map(node.outputs[0], xmap)  # still foldable: BN + bias is affine
        else:
            ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is None:
            return
        for index in range(1, len(node.inputs)):
            ctx.slice_input(node, index, 0, keep)


@register("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
class LayerNormHandler:
    """Blocks channels on the normalised axes; passes the rest."""

    def propagate(self, node, ctx) -> None:
        found = mapped_input(node, ctx)
        if found is None:
            return
        xmap, shape = found
        axis = normalize_axis(int(node.attrs.get("axis", -1)), len(shape))
        if xmap.axis >= axis:
            ctx.block(xmap, f"{node.op} {node.name} normalises over the channel axis")
            return
        for extra in node.outputs[1:]:  # mean / inverse std: one value per normalised row
            if extra is not None and extra.outputs:
                ctx.block(xmap, f"statistics outputs of {node.op} {node.name} are used")
                return
        ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        pass


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")
class SkipNormHandler:
    """onnxruntime's fused residual + norm: ``s = input + skip (+ bias)`` (output 3, the next
    residual) normalised over the hidden (last) axis: channels there are blocked."""

    def propagate(self, node, ctx) -> None:
        ctx.block_inputs(node, f"{node.op} {node.name} normalises over the channel axis")
        for index in (0, 3):  # the normalised output and the residual sum: the input's shape
            if len(node.outputs) > index:
                record_shape(ctx, node.outputs[index], node.inputs[0].shape,
                             node.inputs[0].dtype)

    def apply(self, node, ctx) -> None:
        pass


@register("EmbedLayerNormalization", domain="com.microsoft")
class EmbedNormHandler:
    """onnxruntime's fused BERT embedding: word, position and segment rows gathered by integer
    ids, summed and layer-normalised. Its output (B, S, H) is the residual width, which stays
    whole; the tables are read by rows (ids), never sliced; ``mask_index`` (B,) is one value per
    sequence. Nothing of ours passes; the outputs' shapes are recorded for the layers after."""

    def propagate(self, node, ctx) -> None:
        ctx.block_inputs(node, f"{node.op} {node.name} normalises over the channel axis")
        ids, table = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[2])
        if ids is None or table is None or len(table) != 2:
            return
        rows, dtype = list(node.inputs[0].shape), node.inputs[2].dtype
        record_shape(ctx, node.outputs[0], [*rows, table[1]], dtype)
        if len(node.outputs) > 1:
            record_shape(ctx, node.outputs[1], rows[:1], np.dtype(np.int32))
        if len(node.outputs) > 2:  # embedding_sum, before the norm
            record_shape(ctx, node.outputs[2], [*rows, table[1]], dtype)

    def apply(self, node, ctx) -> None:
        pass


@register("GroupNormalization", "LpNormalization", "LRN", "MeanVarianceNormalization")
class ChannelMixingNormHandler:
    """Statistics over several channels: removing one changes the others."""

    def propagate(self, node, ctx) -> None:
        ctx.block_inputs(node, f"{node.op} {node.name} normalises across channels")

    def apply(self, node, ctx) -> None:
        pass

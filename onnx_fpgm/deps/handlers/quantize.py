"""QuantizeLinear and DequantizeLinear on activations (QDQ models).

Channel algebra: ``y[..., c, ...] = q(x[..., c, ...]; scale_c, zero_point_c)``, so channels pass
through unchanged.

* Per-tensor parameters (a scalar or one-element scale) are shared by every channel: they stay.
* Per-axis parameters (1-D, along ``axis``): when ``axis`` is the channel axis, entry c belongs to
  channel c and is sliced with it; along another axis they do not see channels and stay.
* Blocked parameters (opset 21 ``block_size``, same rank as x): along the channel axis a block
  spans several channels, so those channels are blocked; otherwise the parameters hold every
  channel on the channel axis and are sliced there.
* Parameters computed at run time (not constants) block the channels.
* A split channel axis (attention heads, a channel shuffle) passes a per-tensor quantizer whole;
  per-channel parameters on it block.

Quantizers of stored weights carry no channel map: the consuming Conv/Gemm/MatMul sees the
weight through them (``constants.quantizer_of``) and slices them itself.
"""
from __future__ import annotations

from ..registry import register
from ._util import has_input, normalize_axis


def _layout(node, ctx, xmap) -> str | None:
    """``"tensor"``, ``"axis"`` (per-channel entries) or ``"blocked"``; None after blocking."""
    where = f"{node.op} {node.name}"
    scale = ctx.const(node.inputs[1]) if has_input(node, 1) else None
    zero = ctx.const(node.inputs[2]) if has_input(node, 2) else None
    if scale is None or (has_input(node, 2) and zero is None):
        ctx.block(xmap, f"scale or zero point of {where} is computed at run time")
        return None
    if scale.size == 1:
        return "tensor"
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        ctx.block(xmap, f"rank of the input of {where} is unknown")
        return None
    axis = normalize_axis(int(node.attrs.get("axis", 1)), len(shape))
    blocked = int(node.attrs.get("block_size", 0) or 0)
    if blocked:
        if axis == xmap.axis:
            ctx.block(xmap, f"blocked quantization along the channel axis at {where} "
                            f"(block_size={blocked})")
            return None
        return "blocked"
    if axis != xmap.axis:
        return "tensor"  # per-axis along an axis without channels: nothing to slice
    if scale.size != len(xmap.labels):
        ctx.block(xmap, f"per-channel parameters of {where} do not match its channels")
        return None
    return "axis"


@register("QuantizeLinear", "DequantizeLinear")
class QuantizeHandler:
    """Channels pass through; per-channel parameters are sliced with them (module docstring)."""

    accepts_split = True  # per-tensor parameters: a split channel axis (heads) passes whole

    def propagate(self, node, ctx) -> None:
        smap = ctx.split_map(node.inputs[0])
        if smap is not None:
            scale = ctx.const(node.inputs[1]) if has_input(node, 1) else None
            if scale is not None and scale.size == 1 and \
                    (not has_input(node, 2) or ctx.const(node.inputs[2]) is not None):
                ctx.set_map(node.outputs[0], smap)
            else:
                ctx.block_tensor(node.inputs[0], f"{node.op} {node.name} quantizes a split "
                                                 "channel axis with per-channel parameters")
            return
        xmap = ctx.map(node.inputs[0])
        if xmap is None:
            for param in node.inputs[1:]:
                ctx.block_tensor(param, f"used as a quantization parameter by {node.op} "
                                        f"{node.name}")
            return
        if _layout(node, ctx, xmap) is not None:
            ctx.set_map(node.outputs[0], xmap.passed())

    def apply(self, node, ctx) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is None:
            return
        scale = ctx.const(node.inputs[1])
        if scale.size == 1:
            return
        xmap = ctx.map(node.inputs[0])
        rank = len(ctx.shape(node.inputs[0]))
        axis = normalize_axis(int(node.attrs.get("axis", 1)), rank)
        blocked = int(node.attrs.get("block_size", 0) or 0)
        if not blocked and axis != xmap.axis:
            return
        for param in (1, 2):
            if has_input(node, param):
                ctx.slice_input(node, param, xmap.axis if blocked else 0, keep)


@register("DynamicQuantizeLinear")
class DynamicQuantizeHandler:
    """``y, y_scale, y_zp = DynamicQuantizeLinear(x)``: one scale from the min/max of all of x.

    Removing a channel can change that range, and with it the quantization of every other
    channel, so the pruned model would not equal the masked original: x's channels block.
    (onnxruntime's ``quantize_dynamic`` puts one before every ConvInteger/MatMulInteger.)
    """

    def propagate(self, node, ctx) -> None:
        ctx.block(ctx.map(node.inputs[0]) or ctx.split_map(node.inputs[0]),
                  f"DynamicQuantizeLinear {node.name} computes one scale from all channels "
                  "(min/max of the tensor): removing one would change the others' quantization")

    def apply(self, node, ctx) -> None:
        pass

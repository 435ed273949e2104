"""com.microsoft ``MatMulNBits``: int2/int4/int8 weights quantized block-wise along K.

``Y = A @ W + bias`` with ``W^T[n, k] = (code[n, k] - zero[n, b]) * scale[n, b]`` for the block
``b = k // block_size``; ``B`` stores the codes ``(N, k_blocks, blob_size)``, packed low bits first
(``8 // bits`` codes a byte), ``scales`` and float ``zero_points`` hold ``(N, k_blocks)`` values
(2-D or flat), packed ``zero_points`` ``(N, ceil(k_blocks * bits / 8))`` codes; no zero point
means ``2 ** (bits - 1)``.

Channel algebra, as for MatMul (``linear``): output feature n is row n of ``B``, its scales and
zero points and ``bias[n]`` (a new atom, scored by the dequantized row); input feature k is column
k of every row.

Input columns go in whole blocks. A block's scale and zero point belong to ``block_size``
consecutive columns and ``A`` reaches the kernel with exactly ``K`` columns, so removing some
columns of a block would shift columns of the next block under this block's scale: no exact
repacking keeps them both (``g_idx``, which could name each column's block, is deprecated and
not used by the fast kernels), and requantizing is not exact. So the handler couples the columns
of each block into one channel: the planner keeps or removes a block whole (pruning granularity
``block_size`` on the input side). A removed block drops out of ``B``, ``scales`` and
``zero_points``; the kept blocks keep their codes, scales and zero points bit for bit, and ``K``
shrinks by ``block_size`` per block. The last block may be partial (``K`` not a multiple of
``block_size``): its padding codes stay where they are, at the end. The masked original for the
oracle sets the removed columns' codes to the zero point (``oracle.masking``), which dequantize
to exactly 0.

Left whole (blocked, with a reason): a weight, scale, zero point or bias not stored, a ``g_idx``,
a prepacked ``B`` (``weight_prepacked``), bit widths that do not divide a byte, shapes that do not
match the attributes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import RewriteError
from ..channels import ChannelMap
from ..registry import register
from ._util import has_input
from .linear import score_heads_with

MS = "com.microsoft"
B, SCALES, ZERO_POINTS, G_IDX, BIAS = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class NBitsLayout:
    """The attributes of one MatMulNBits and the sizes they imply."""

    k: int
    n: int
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def blob_size(self) -> int:
        return self.block_size * self.bits // 8

    @classmethod
    def of(cls, node) -> NBitsLayout:
        return cls(int(node.attrs["K"]), int(node.attrs["N"]), int(node.attrs.get("bits", 4)),
                   int(node.attrs["block_size"]))


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes along the last axis of ``packed`` (uint8, low bits first), the first ``count``."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def pack(codes: np.ndarray, bits: int, nbytes: int) -> np.ndarray:
    """``codes`` (last axis) packed into ``nbytes`` uint8, low bits first, zero-padded."""
    per_byte = 8 // bits
    padded = np.zeros((*codes.shape[:-1], nbytes * per_byte), np.uint8)
    padded[..., :codes.shape[-1]] = codes
    grouped = padded.reshape(*codes.shape[:-1], nbytes, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte, dtype=np.uint16) * bits
    return (grouped << shifts).sum(axis=-1).astype(np.uint8)


def zero_points(const, node, layout: NBitsLayout) -> np.ndarray | None:
    """The ``(N, k_blocks)`` zero points (float for a float input, codes for packed, the default
    ``2 ** (bits - 1)`` when absent); None when given but not stored. ``const`` reads a
    tensor's stored value (``ctx.const``, ``ConstantFolder.value``)."""
    if not has_input(node, ZERO_POINTS):
        return np.full((layout.n, layout.k_blocks), 1 << (layout.bits - 1), np.uint8)
    stored = const(node.inputs[ZERO_POINTS])
    if stored is None:
        return None
    if stored.dtype == np.uint8:
        return unpack(stored.reshape(layout.n, -1), layout.bits, layout.k_blocks)
    return stored.reshape(layout.n, layout.k_blocks)


def layout_problem(ctx, node) -> str | None:
    """Why this MatMulNBits cannot be pruned (None: it can)."""
    where = f"N-bit layer {node.op} {node.name}"
    try:
        layout = NBitsLayout.of(node)
    except (KeyError, TypeError, ValueError):
        return f"{where} lacks its K, N or block_size attribute"
    if layout.bits not in (1, 2, 4, 8) or layout.block_size < 1 or \
            layout.block_size * layout.bits % 8:
        return f"{where}: {layout.bits}-bit codes in blocks of {layout.block_size} do not fill bytes"
    if int(node.attrs.get("weight_prepacked", 0)):
        return f"{where}: B is prepacked for one execution provider"
    if has_input(node, G_IDX):
        return f"{where} has a g_idx (columns in another order than their blocks)"
    values = {i: ctx.const(node.inputs[i]) for i in (B, SCALES, BIAS) if has_input(node, i)}
    if B not in values or SCALES not in values or any(v is None for v in values.values()) or \
            zero_points(ctx.const, node, layout) is None:
        return f"{where}: weight, scales, zero points or bias not stored constants"
    if values[B].dtype != np.uint8 or \
            values[B].shape != (layout.n, layout.k_blocks, layout.blob_size) or \
            values[SCALES].size != layout.n * layout.k_blocks or \
            (BIAS in values and values[BIAS].shape != (layout.n,)):
        return f"{where}: stored shapes do not match K={layout.k}, N={layout.n}"
    return None


def dequantized_rows(ctx, node, layout: NBitsLayout) -> np.ndarray:
    """``W^T`` as float32 ``(N, K)``: one row per output feature (what FPGM scores)."""
    codes = unpack(ctx.const(node.inputs[B]), layout.bits, layout.block_size)
    zero = zero_points(ctx.const, node, layout).astype(np.float32)[..., None]
    scale = ctx.const(node.inputs[SCALES]).astype(np.float32).reshape(
        layout.n, layout.k_blocks, 1)
    rows = (codes.astype(np.float32) - zero) * scale
    return rows.reshape(layout.n, -1)[:, :layout.k]


@register("MatMulNBits", domain=MS)
class MatMulNBitsHandler:
    """MatMulNBits: producer of output features, consumer of input blocks (module docstring)."""

    def propagate(self, node, ctx) -> None:
        problem = layout_problem(ctx, node)
        a_shape = ctx.shape(node.inputs[0])
        if problem is None and (a_shape is None or len(a_shape) < 2):
            problem = f"N-bit layer {node.op} {node.name}: input of unknown rank"
        if problem is not None:
            ctx.block_inputs(node, problem)
            return
        layout = NBitsLayout.of(node)
        y = node.outputs[0]
        if y.shape is None:  # onnx does not infer com.microsoft ops
            y.shape, y.dtype = [*node.inputs[0].shape[:-1], layout.n], node.inputs[0].dtype
            ctx.refined.add(y.name)
        amap, rank = ctx.map(node.inputs[0]), len(a_shape)
        if amap is not None and amap.axis < rank - 1:
            ctx.set_map(y, amap.passed())  # channels ride along; our output features stay fixed
            return
        if amap is not None:
            if len(amap.labels) != layout.k:
                ctx.block(amap, f"N-bit layer {node.op} {node.name} reads "
                                f"{len(amap.labels)} channels, K is {layout.k}")
                amap = None
            else:
                _couple_blocks(ctx, node, amap, layout.block_size)
        rows = dequantized_rows(ctx, node, layout)
        score_heads_with(node, ctx, amap, rows.T)
        atoms = ctx.new_source(node, rows)
        ctx.set_map(y, ChannelMap(rank - 1, atoms, fold_member=len(ctx.members) - 1))

    def apply(self, node, ctx) -> None:
        if not ctx.is_source(node):
            return
        layout = NBitsLayout.of(node)
        keep_in, keep_out = ctx.keep(node.inputs[0]), ctx.keep(node.outputs[0])
        if keep_in is None and keep_out is None:
            return
        rows = np.arange(layout.n) if keep_out is None else keep_out
        blocks = np.arange(layout.k_blocks)
        if keep_in is not None:
            blocks = np.unique(keep_in // layout.block_size)
            sizes = np.minimum(layout.block_size, layout.k - blocks * layout.block_size)
            if np.bincount(keep_in // layout.block_size, minlength=layout.k_blocks)[blocks] \
                    .tolist() != sizes.tolist():
                raise RewriteError(f"{node.name}: a block of input columns is partly removed")
        grid = np.ix_(rows, blocks)
        ctx.set_input_value(node, B, ctx.const(node.inputs[B])[grid])
        scales = ctx.const(node.inputs[SCALES])
        ctx.set_input_value(node, SCALES, scales.reshape(layout.n, -1)[grid].reshape(
            -1 if scales.ndim == 1 else (len(rows), len(blocks))))
        if has_input(node, ZERO_POINTS):
            stored = ctx.const(node.inputs[ZERO_POINTS])
            kept = zero_points(ctx.const, node, layout)[grid]
            if stored.dtype == np.uint8:
                kept = pack(kept, layout.bits, -(-len(blocks) * layout.bits // 8))
            ctx.set_input_value(node, ZERO_POINTS, kept.reshape(
                -1 if stored.ndim == 1 else kept.shape))
        if keep_out is not None and has_input(node, BIAS):
            ctx.slice_input(node, BIAS, 0, keep_out)
        node.attrs["N"] = len(rows)
        if keep_in is not None:
            node.attrs["K"] = len(keep_in)


def _couple_blocks(ctx, node, amap: ChannelMap, block_size: int) -> None:
    """The input columns of each block become one channel (module docstring); a block with a
    column that is not ours stays whole."""
    where = f"{node.op} {node.name} (one scale per block of {block_size} input columns)"
    for start in range(0, len(amap.labels), block_size):
        block = amap.labels[start:start + block_size]
        ctx.couple(np.full_like(block, block[0]), block, where)

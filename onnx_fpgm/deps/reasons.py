"""Why a group is left unpruned: every blocking reason the engine emits, in categories.

The README's section "What onnx-fpgm will not prune, and why" is generated from this table
(``python -m onnx_fpgm.deps.reasons``) and a test checks that it is current, and that every
frozen reason seen in the test corpus falls into one of these categories.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ReasonKind:
    """A family of blocking reasons."""

    title: str
    pattern: str
    why: str


REASONS: tuple[ReasonKind, ...] = (
    ReasonKind("graph outputs", r"reaches graph output",
               "Channels that reach a graph output: removing them would change the model's "
               "interface (inputs and outputs never change, but for KV caches under "
               "`--allow-interface-change`)."),
    ReasonKind("ops without a handler", r"unsupported op|could not analyse",
               "Channels consumed by an op the engine has no handler for (TopK, "
               "QOperator ops such as QLinearConv, custom domains, ...). Unknown ops are never assumed to be element-wise."),
    ReasonKind("control flow", r"control-flow op|outputs of (If|Loop|Scan)",
               "Channels that are an input of If/Loop/Scan, or reach the outputs of one of "
               "their bodies (kept whole in every branch). Layers inside the bodies are pruned "
               "where their channels stay in the body."),
    ReasonKind("ops that mix channels",
               r"normalises (over the channel axis|across channels)|reduces over (the channel "
               r"axis|all axes)|indexes channels|steps over channels",
               "LayerNormalization over the channel axis, GroupNormalization, LRN, "
               "LpNormalization, Softmax or a reduction over the channel axis, Gather or a "
               "strided Slice on channels: the remaining channels' values would change, so "
               "the result could not equal the original."),
    ReasonKind("reshaping the channel axis",
               r"splits the channel axis|removes the channel axis|pads the channel axis|"
               r"crops with a roi|channel-changing|broadcasts the channel axis",
               "Pad along the channel axis with reflect/edge modes or computed pads, Resize "
               "along the channel axis, an Expand that broadcasts a one-channel "
               "axis wider, or a Reshape that merges the channel axis with a neighbour in a way "
               "no block rule covers."),
    ReasonKind("split channel axes and attention",
               r"split channel axis|split at|pairs heads|pairs head axes|contracts channels of "
               r"two activations|mixes channels of two operands|activations of unknown rank|"
               r"fused attention",
               "A channel axis split into levels (attention heads, a channel shuffle) is pruned "
               "by whole heads or by the same offset in every block; it blocks when a consumer "
               "needs two levels pruned at once, reads a level with a computed index or shape, "
               "regroups the levels, or mixes them with channels that are not ours (an operand "
               "that is not ours, such as rotary's cos/sin, only keeps the heads out of the "
               "levels it spans). Grouped-query heads (repeat_kv) go by KV groups; where the KV heads stay "
               "(a KV cache), by query slots, the same in every group. A product "
               "of two activations that contracts plain channels blocks them. Fused "
               "com.microsoft Attention/MultiHeadAttention lose whole heads (num_heads "
               "rewritten), GroupQueryAttention whole KV groups (q|k|v separate or packed; "
               "with a key/value cache, whose KV heads stay but under "
               "--allow-interface-change, the same query slots of every "
               "group), but block with a key/value cache, a computed attention bias, "
               "MultiHeadAttention's packed or 4-D q/k/v, or when their own input channels "
               "are ours; ONNX Attention "
               "(opset 23) likewise (grouped-query heads go by KV groups)."),
    ReasonKind("head dimensions", r"head_dim at|head dims",
               "Within each kept head, `--sparsity` of its head_dim goes too, or what a "
               "target's allocation gives it (the same dimensions from every head of a layer, "
               "so the Reshape to (heads, head_dim) stays exact; q and k lose the same ones, "
               "with rotary in pairs (i, i + d/2: cos/sin read on the kept dims, rotate_half's "
               "bounds moved), v loses them with the output projection's rows; `--exclude` and "
               "`--layer-sparsity` apply by the layers they belong to; `--keep-head-dims` keeps "
               "them). They stay whole where something else needs all of them: a softmax scale "
               "computed from a Shape of q that reads a symbolic size (one computed from static "
               "sizes, head_dim, is replaced by the original's constant), a per-head norm over "
               "head_dim, a computed Reshape, Expand or Slice size, a KV cache (head_dim is its "
               "interface), fused attention ops, and a record whose heads stay whole."),
    ReasonKind("grouped convolutions",
               r"grouped conv|grouped ConvTranspose|same channel count in every group",
               "Depthwise convs with a channel multiplier > 1 and grouped ConvTranspose; and a "
               "grouped Conv whose groups would not all keep the same number of channels "
               "(each group is pruned at the same rate; a coupling that breaks the balance "
               "freezes them)."),
    ReasonKind("quantized layers",
               r"quantized layers|computed by (DequantizeLinear|QuantizeLinear)|blocked "
               r"quantization|quantization parameter|scale or zero point of|per-channel "
               r"parameters of|computes one scale from all channels|N-bit layer",
               "QDQ models are pruned like float ones (weights through DequantizeLinear are "
               "scored dequantized; W_q, per-axis scales and zero points and int32 biases are "
               "sliced; activation Q/DQ pairs pass channels), and so are QLinearConv and "
               "com.microsoft QGemm, QLinearAdd/QLinearMul, QLinearConcat, QLinearAveragePool, "
               "QLinearGlobalAveragePool, QLinearSigmoid/QLinearLeakyRelu, and com.microsoft "
               "MatMulNBits (int2/int4/int8 block-quantized weights: output rows with their "
               "scales and zero points, input columns in whole blocks). Left whole: QOperator "
               "and integer layers without a handler yet (QLinearMatMul, ConvInteger, "
               "MatMulInteger, onnxruntime's DynamicQuantizeLSTM/DynamicQuantizeMatMul: named "
               "in the report, a model with nothing else is written unchanged, exit 0), "
               "blocked quantization (opset 21 block_size: one scale per block of rows), "
               "float8/int4 tensors of opset 21, a MatMulNBits with a g_idx, a prepacked B or "
               "weights not stored, quantization parameters computed at run time or carrying "
               "channels, blocked activation parameters along the channel axis, and channels "
               "read by DynamicQuantizeLinear (one scale from the min/max of all channels: "
               "removing one would change the quantization of the others)."),
    ReasonKind("computed weights or parameters",
               r"not a stored|not constant|computed shape|no constant 2-D weight|"
               r"computed or",
               "Weights, biases, split sizes, slice bounds, or the channel count in a reshape "
               "target or resize sizes, computed at run time from graph inputs (a stored "
               "constant, a Constant node, or a constant subgraph is fine; so is a target "
               "assembled from a batch read by Shape and constant channel counts, as tf2onnx's "
               "Flatten and torch's x.view(x.size(0), -1) write it, and a channel count read by "
               "Shape from the tensor itself)."),
    ReasonKind("unknown shapes", r"unknown|cannot resolve",
               "Shapes that cannot be inferred, or that depend on the input size, where the "
               "channel mapping depends on them (e.g. Flatten or Reshape after symbolic spatial "
               "dims that the model accepts at several sizes); a static export helps the "
               "analysis."),
    ReasonKind("coupled with fixed channels",
               r"coupled with channels that cannot be pruned|broadcast channel axis|"
               r"different axes|joins different channel counts",
               "Channels tied by a residual Add, a Mul or a Concat on another axis to channels "
               "that cannot be pruned, such as a graph input or a blocked branch."),
    ReasonKind("constant channels alone", r"constant channels of .* meet no filters",
               "Constant channels a Concat or a constant-mode Pad adds on the channel axis "
               "(zero padding of a short cut, coordinate channels) that meet no layer's "
               "filters: nothing scores them, so they stay. Where they meet a branch's "
               "channels at an Add, those channels prune and the padding shrinks with them."),
    ReasonKind("recurrent layers", r"recurrent layer",
               "LSTM/GRU/RNN consume pruned channels on the input features of their sequence "
               "(axis 2 of X; W sliced on its input axis) and lose hidden units (W, R, B, "
               "peepholes and constant initial states sliced alike); the units stay whole when "
               "an initial state or a bias is not a stored constant (a streaming model's state "
               "inputs), and channels that reach the layer on another axis or on an initial "
               "state block."),
    ReasonKind("sequences", r"sequence from",
               "A SplitToSequence whose sequence is read by anything but SequenceAt with a "
               "constant index."),
    ReasonKind("unexpected layout",
               r"on axis \d+, not 1|transposed|channel count read by",
               "Channels arriving on an axis an op does not expect (a Conv fed channels-last "
               "data, a Gemm with transA) or a channel count used as data."),
    ReasonKind("used side outputs", r"training-mode outputs|mask output|indices output|statistics outputs",
               "Training-mode BatchNormalization statistics, Dropout masks, MaxPool indices "
               "or a LayerNormalization's mean/inverse deviation that something reads."),
    ReasonKind("your options", r"excluded by --exclude",
               "Groups you excluded with --exclude."),
    ReasonKind("scoring cost", r"scoring by FPGM would (take|need)",
               "A group so wide that comparing every filter with every other (FPGM is "
               "O(N^2 D)) would overrun the scoring budget (a 1M-output Gemm: about an hour) or half "
               "the free memory; the reason names the estimate. --criterion l2 or l1 ranks "
               "such a group by norm in O(N D); max_scoring_work (Python) raises the budget."),
    ReasonKind("safety net", r"would empty tensor",
               "A plan that would leave some tensor with no channel at all, even after the "
               "group was selected part by part (the same fraction inside and outside that "
               "tensor); the groups involved are kept."),
)

_COMPILED = tuple((kind, re.compile(kind.pattern)) for kind in REASONS)


def classify(reason: str) -> ReasonKind | None:
    """The category of a frozen reason (None: an undocumented reason, a bug to fix)."""
    for kind, regex in _COMPILED:
        if regex.search(reason):
            return kind
    return None


def markdown() -> str:
    """The README section body."""
    lines = ["| what | why |", "| --- | --- |"]
    lines += [f"| {kind.title} | {kind.why} |" for kind in REASONS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

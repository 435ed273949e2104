"""Consumer layers as linear maps: what compensation and the OBS criterion both read.

A consumer (Conv with group 1, Gemm, MatMul) computes ``Y = W A (+ b)`` where ``A`` holds design
rows: a Conv's unfolded ``C*kh*kw`` patches (channel-major, as ``torch.nn.functional.unfold``
lays them out), a Gemm's input rows, a MatMul's last-axis vectors. ``weight_rows`` gives ``W`` as
(out, D) over those columns; ``write_weight_rows`` writes a refitted one back in the node's own
layout. The model runs here with intermediate tensors exposed as extra outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..deps.channels import Analysis
from ..measure.calibration import Calibration, run_batched
from ..model.runtime import make_session

#: Rows (output positions x samples) used per fit.
MAX_ROWS = 20000


@dataclass
class Consumer:
    """A node reading removed channels: where they sit on its input and in its weight."""

    node: str
    op: str
    input: str
    removed: np.ndarray  # positions on the input's channel axis
    kept: np.ndarray
    kept_out: np.ndarray | None  # surviving output channels when the consumer is pruned too


def find_consumers(original: onnx.ModelProto, analysis: Analysis,
                   removed_atoms: np.ndarray) -> list[Consumer]:
    """Consumers of removed channels in topological order."""
    result = []
    for node in original.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not node.input:
            continue
        cmap = analysis.maps.get(node.input[0])
        if cmap is None:
            continue
        if node.op_type == "Conv" and attr(node, "group", 1) != 1:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        rank = analysis.ranks.get(node.input[0])
        axis_ok = cmap.axis == 1 if node.op_type != "MatMul" else (
            rank is not None and cmap.axis == rank - 1)
        gone = removed_atoms[cmap.labels]
        if axis_ok and gone.any():
            out_map = analysis.maps.get(node.output[0])
            kept_out = None
            if out_map is not None and out_map is not cmap and out_map.labels is not cmap.labels:
                kept_out = np.flatnonzero(~removed_atoms[out_map.labels])
            result.append(Consumer(node.name, node.op_type, node.input[0],
                                   np.flatnonzero(gone), np.flatnonzero(~gone), kept_out))
    return result


#: Consumers whose weights are quantized codes: a refit or a bias fold would requantize them.
UNCOMPENSATED_OPS = frozenset({"MatMulNBits"})


def uncompensated(original: onnx.ModelProto, analysis: Analysis,
                  removed_atoms: np.ndarray) -> list[str]:
    """Names of the consumers of removed channels that compensation leaves as they are."""
    return [node.name for node in original.graph.node
            if node.op_type in UNCOMPENSATED_OPS and node.input and
            (cmap := analysis.maps.get(node.input[0])) is not None and
            removed_atoms[cmap.labels].any()]


def attr(node: onnx.NodeProto, name: str, default):
    """Attribute ``name`` of ``node``, else ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    """The top-level node called ``name``."""
    return next(n for n in model.graph.node if n.name == name)


def constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` output, else None (computed or absent)."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def set_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray,
              suffix: str) -> None:
    """Give ``node`` its own new initializer at input ``index`` (never touches shared ones)."""
    name = f"{node.name}{suffix}"
    existing = {t.name for t in model.graph.initializer}
    while name in existing:
        name += "_"
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def expose(model: onnx.ModelProto, names: list[str]) -> bytes:
    """Serialised copy of ``model`` with extra graph outputs (intermediate tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy.SerializeToString()


def run_exposed(model: onnx.ModelProto, names: list[str],
                calibration: Calibration) -> list[np.ndarray]:
    """The tensors ``names`` over all calibration samples."""
    session = make_session(expose(model, names), optimize=True)  # fitting needs no exactness
    return run_batched(session, model, calibration, names)


def first_samples(calibration: Calibration, n: int) -> Calibration:
    """The first ``n`` samples (fits need rows, not the whole set)."""
    return Calibration({k: v[:n] for k, v in calibration.inputs.items()},
                       None if calibration.labels is None else calibration.labels[:n])


def conv_samples(output_shape: tuple[int, ...]) -> int:
    """Samples whose unfolded patches give enough rows for a Conv with this output shape."""
    positions = int(np.prod(output_shape[2:]))
    return max(1, math.ceil(4 * MAX_ROWS / max(positions, 1)))


def fits_conv(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """A 2-D Conv with explicit pads (what ``design_rows`` unfolds)."""
    return weight.ndim == 4 and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


def design_rows(node: onnx.NodeProto, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The consumer's input ``x`` as design rows (one per output position and sample)."""
    if node.op_type == "Conv":
        import torch  # the unfold; torch stays off the start-up path

        pads = list(attr(node, "pads", [0, 0, 0, 0]))
        xt = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
        cols = torch.nn.functional.unfold(
            xt, weight.shape[2:], dilation=list(attr(node, "dilations", [1, 1])),
            stride=list(attr(node, "strides", [1, 1])))  # (N, C*k*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
    if node.op_type == "Gemm":
        return x.reshape(len(x), -1)
    return x.reshape(-1, x.shape[-1])


def output_rows(node: onnx.NodeProto, y: np.ndarray) -> np.ndarray:
    """The consumer's output ``y`` as rows matching ``design_rows``."""
    if node.op_type == "Conv":
        return y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).reshape(-1, y.shape[1])
    if node.op_type == "Gemm":
        return y.reshape(len(y), -1)
    return y.reshape(-1, y.shape[-1])


def weight_rows(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """``W`` as (out, D) over the design columns (Gemm's alpha folded in)."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "Gemm":
        return (w if attr(node, "transB", 0) else w.T) * attr(node, "alpha", 1.0)
    return w.T


def bias_of(model: onnx.ModelProto, node: onnx.NodeProto, n_out: int) -> np.ndarray | None:
    """The bias added to each output (Gemm's beta folded in), zeros when the node has none;
    None when the bias is computed or does not broadcast as one value per output."""
    if node.op_type == "MatMul":
        return None
    if len(node.input) <= 2 or not node.input[2]:
        return np.zeros(n_out)
    bias = constant(model, node.input[2])
    if bias is None or bias.size not in (1, n_out):
        return None
    scale = attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (n_out,)) * scale


def rows_to_weight(node: onnx.NodeProto, like: np.ndarray, rows: np.ndarray,
                   bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight rows (out, D) and bias back in ``node``'s own layout and dtype (``like``)."""
    if node.op_type == "Conv":
        return rows.reshape(like.shape).astype(like.dtype), bias.astype(like.dtype)
    if node.op_type == "Gemm":
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        new_w = (rows if attr(node, "transB", 0) else rows.T) / alpha
        # beta 0: the op ignores its bias (the fit's bias column was zero): store zeros
        stored = bias / beta if beta else np.zeros_like(bias)
        return new_w.astype(like.dtype), stored.astype(like.dtype)
    return rows.T.astype(like.dtype), None


def write_weight_rows(model: onnx.ModelProto, node: onnx.NodeProto, like: np.ndarray,
                      rows: np.ndarray, bias: np.ndarray | None) -> None:
    """Give ``node`` new weights (out, D) and bias in its own layout and dtype (``like``)."""
    weight, bias = rows_to_weight(node, like, rows, bias)
    set_input(model, node, 1, weight, "_refit_weight")
    if bias is not None:
        set_input(model, node, 2, bias, "_refit_bias")

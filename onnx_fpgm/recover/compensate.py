"""Post-training compensation of removed channels (no retraining).

Removing a channel shifts every consumer's output by that channel's contribution. Two ways to
recover most of it, applied to the consumers of removed channels (Conv with group 1, Gemm,
MatMul followed by a bias Add):

* ``bias``: the removed channels' *mean* contribution is folded into the consumer's bias:
  ``b[o] += sum_{c removed} mu_c * sum_k W[o, c, k]``. The means come from calibration data, or,
  without data, in closed form from a BatchNormalization (+ ReLU) right before the consumer
  (``E[relu(N(beta, gamma^2))]``). Exact for a channel whose activation is constant (up to
  zero-padded borders).
* ``lstsq``: each consumer's remaining weights and bias are refitted by ridge-regularised least
  squares so that its output on the calibration data matches the original model's output, layer
  after layer in topological order, using the pruned model's own (already compensated) inputs.

Compensated layers no longer equal the masked original, so the exactness oracle runs on the
uncompensated rewrite first; the compensated model is then checked to run with the same
interface and finite outputs, and its fidelity on the calibration data is reported.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..deps.channels import Analysis
from ..measure.calibration import Calibration, run_batched
from ..model.runtime import make_session

logger = logging.getLogger(__name__)

#: Rows (output positions x samples) used per least-squares fit.
MAX_ROWS = 20000
#: Calibration samples used by least squares (Gemm/MatMul consumers fit one row per sample).
MAX_SAMPLES = 512


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
        if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
            continue
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
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


def compensate(original: onnx.ModelProto, pruned: onnx.ModelProto, consumers: list[Consumer],
               mode: str, calibration: Calibration | None) -> tuple[onnx.ModelProto, list[str]]:
    """Return a compensated copy of ``pruned`` and notes on what was (not) done."""
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    notes: list[str] = []
    if mode == "none" or not consumers:
        return model, notes
    if mode == "lstsq" and calibration is None:
        notes.append("lstsq needs --calibration data; used bias compensation instead")
        mode = "bias"
    means = _input_means(original, consumers, calibration) if calibration is not None else {}
    targets: dict[str, np.ndarray] = {}
    if mode == "lstsq":  # every consumer's original output, in one run
        calibration = _subset(calibration, MAX_SAMPLES)
        names = [_node(original, c.node).output[0] for c in consumers]
        targets = dict(zip(names, _run(original, names, calibration)))
    for consumer in consumers:
        if mode == "lstsq":
            done = _refit(original, model, consumer, calibration, targets)
            if done:
                continue
        mu = means.get(consumer.input)
        if mu is None:
            mu = _closed_form_means(original, consumer.input)
        if mu is None:
            notes.append(f"{consumer.node}: no calibration data and no BatchNorm statistics "
                         f"before it; not compensated")
            continue
        _fold_bias(original, model, consumer, mu, notes)
    _drop_unused_initializers(model)
    return model, notes


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Replaced weights and biases are no longer read by any node: remove them, whether stored
    as initializers or as ``Constant`` nodes (paddle2onnx stores every weight that way)."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    for node in model.graph.node:  # names read inside subgraphs
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= {n for sub in attr.g.node for n in sub.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    nodes = [n for n in model.graph.node
             if n.op_type != "Constant" or any(o in used for o in n.output)]
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


# ---- shared helpers ----
def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _set_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray,
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


def _expose(model: onnx.ModelProto, names: list[str]) -> bytes:
    """Serialised copy of ``model`` with extra graph outputs (intermediate tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy.SerializeToString()


def _run(model: onnx.ModelProto, names: list[str], calibration: Calibration) -> list[np.ndarray]:
    session = make_session(_expose(model, names), optimize=True)  # fitting needs no exactness
    return run_batched(session, model, calibration, names)


def _subset(calibration: Calibration, n: int) -> Calibration:
    """The first ``n`` samples (least squares needs rows, not the whole set)."""
    return Calibration({k: v[:n] for k, v in calibration.inputs.items()},
                       None if calibration.labels is None else calibration.labels[:n])


# ---- bias ----
def _input_means(original, consumers, calibration) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(c.input for c in consumers))
    values = _run(original, names, calibration)
    means = {}
    for name, value, consumer in zip(names, values, [next(c for c in consumers if c.input == n)
                                                     for n in names]):
        if consumer.op == "MatMul":
            means[name] = value.reshape(-1, value.shape[-1]).mean(0)
        else:
            means[name] = value.reshape(value.shape[0], value.shape[1], -1).mean((0, 2))
    return means


def _closed_form_means(original: onnx.ModelProto, tensor: str) -> np.ndarray | None:
    """Mean of BN output (beta) or of ReLU(BN) (a rectified Gaussian), per channel."""
    producers = {o: n for n in original.graph.node for o in n.output}
    node = producers.get(tensor)
    relu = node is not None and node.op_type == "Relu"
    if relu:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "BatchNormalization":
        return None
    gamma, beta = _const(original, node.input[1]), _const(original, node.input[2])
    if gamma is None or beta is None:
        return None
    beta = beta.astype(np.float64)
    if not relu:
        return beta
    sigma = np.abs(gamma.astype(np.float64)) + 1e-12
    z = beta / sigma
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return beta * cdf + sigma * pdf


def _fold_bias(original, model, consumer: Consumer, mu: np.ndarray, notes: list[str]) -> None:
    onode = _node(original, consumer.node)
    pnode = _node(model, consumer.node)
    weight = _const(original, onode.input[1])
    if weight is None:
        notes.append(f"{consumer.node}: weight is not stored; not compensated")
        return
    mu_removed = mu[consumer.removed].astype(np.float64)
    w = weight.astype(np.float64)
    if consumer.op == "Conv":
        per_channel = w[:, consumer.removed].reshape(w.shape[0], len(consumer.removed), -1)
        delta = np.einsum("ock,c->o", per_channel, mu_removed)
        bias_index, out_dtype = 2, weight.dtype
    elif consumer.op == "Gemm":
        kn = w.T if _attr(onode, "transB", 0) else w
        delta = mu_removed @ kn[consumer.removed]
        delta *= _attr(onode, "alpha", 1.0) / _attr(onode, "beta", 1.0)
        bias_index, out_dtype = 2, weight.dtype
    else:  # MatMul: fold into an exclusive bias Add that follows
        delta = mu_removed @ w[consumer.removed]
        if consumer.kept_out is not None:
            delta = delta[consumer.kept_out]
        _fold_into_following_add(model, pnode, delta, notes)
        return
    if consumer.kept_out is not None:
        delta = delta[consumer.kept_out]
    bias = _const(model, pnode.input[bias_index]) if len(pnode.input) > bias_index and \
        pnode.input[bias_index] else np.zeros(len(delta), dtype=out_dtype)
    if bias.shape != delta.shape:
        notes.append(f"{consumer.node}: bias of shape {bias.shape} not compensated")
        return
    _set_input(model, pnode, bias_index, (bias.astype(np.float64) + delta).astype(out_dtype),
               "_compensated_bias")


def _fold_into_following_add(model, node, delta, notes) -> None:
    users = [n for n in model.graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = 1 if add.input[0] == node.output[0] else 0
        bias = _const(model, add.input[other])
        if bias is not None and bias.shape[-1:] == delta.shape:
            new = (bias.astype(np.float64) + delta).astype(bias.dtype)
            _set_input(model, add, other, new, "_compensated_bias")
            return
    notes.append(f"{node.name}: MatMul without an exclusive bias Add; not compensated")


# ---- lstsq ----
def _refit(original, model, consumer: Consumer, calibration, targets) -> bool:
    """Refit one consumer's weights/bias; False when the form is not supported (use bias)."""
    import torch

    pnode = _node(model, consumer.node)
    onode = _node(original, consumer.node)
    weight = _const(model, pnode.input[1])
    if weight is None or weight.dtype.kind != "f":
        return False
    x = _run(model, [pnode.input[0]], calibration)[0].astype(np.float64)
    y = targets[onode.output[0]].astype(np.float64)
    if consumer.op == "Conv":
        if weight.ndim != 4 or _attr(pnode, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return False
        positions = int(np.prod(y.shape[2:]))
        samples = max(1, math.ceil(4 * MAX_ROWS / max(positions, 1)))
        x, y = x[:samples], y[:samples]  # enough rows; unfolding everything costs GBs
        pads = list(_attr(pnode, "pads", [0, 0, 0, 0]))
        xt = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
        cols = torch.nn.functional.unfold(
            xt, weight.shape[2:], dilation=list(_attr(pnode, "dilations", [1, 1])),
            stride=list(_attr(pnode, "strides", [1, 1])))  # (N, C*k*k, L)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
        target = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).reshape(-1, y.shape[1])
    elif consumer.op == "Gemm":
        a, target = x.reshape(len(x), -1), y.reshape(len(y), -1)
    else:
        a, target = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if consumer.kept_out is not None:
        target = target[:, consumer.kept_out]
    if len(a) != len(target):
        return False
    if len(a) > MAX_ROWS:
        pick = np.random.default_rng(0).choice(len(a), MAX_ROWS, replace=False)
        a, target = a[pick], target[pick]
    with_bias = consumer.op != "MatMul"
    design = np.concatenate([a, np.ones((len(a), 1))], 1) if with_bias else a
    gram = design.T @ design
    ridge = 1e-4 * np.trace(gram) / len(gram)
    solution = np.linalg.solve(gram + ridge * np.eye(len(gram)), design.T @ target)
    w_fit, b_fit = (solution[:-1], solution[-1]) if with_bias else (solution, None)
    if consumer.op == "Conv":
        new_w = w_fit.T.reshape(weight.shape)
        _set_input(model, pnode, 1, new_w.astype(weight.dtype), "_refit_weight")
        _set_input(model, pnode, 2, b_fit.astype(weight.dtype), "_refit_bias")
    elif consumer.op == "Gemm":
        alpha, beta = _attr(pnode, "alpha", 1.0), _attr(pnode, "beta", 1.0)
        new_w = (w_fit.T if _attr(pnode, "transB", 0) else w_fit) / alpha
        _set_input(model, pnode, 1, new_w.astype(weight.dtype), "_refit_weight")
        _set_input(model, pnode, 2, (b_fit / beta).astype(weight.dtype), "_refit_bias")
    else:
        _set_input(model, pnode, 1, w_fit.astype(weight.dtype), "_refit_weight")
    return True

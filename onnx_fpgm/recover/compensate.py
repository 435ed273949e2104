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
* ``obs``: the Optimal Brain Surgeon update of every consumer at once, in closed form from the
  original model's input statistics (``obs.py``): least squares on the original inputs, one
  model run in all; a consumer it cannot serve gets ``bias``.
* ``sequential``: layer-wise reconstruction in one pass (``sequential.py``): the pruned and the
  original model walk the calibration samples side by side, and each consumer is refitted on
  its actual (already compensated) input against the original layer's output; the OBS update
  where the input has not drifted, lstsq's fit without one model run per layer (on YOLOv8n's
  sensitivity plans better than ``obs`` at two cuts of three, worse on its uniform plan:
  benchmarks/RESULTS.md). A consumer the fit cannot take gets ``bias``; a graph the torch
  executor cannot run gets ``obs``.

Compensated layers no longer equal the masked original, so the exactness oracle runs on the
uncompensated rewrite first; the compensated model is then checked to run with the same
interface and finite outputs, and its fidelity on the calibration data is reported.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from ..measure.calibration import Calibration
from . import sequential
from .layers import (
    MAX_ROWS,
    Consumer,
    attr,
    constant,
    conv_samples,
    design_rows,
    find_consumers,
    first_samples,
    fits_conv,
    node_named,
    output_rows,
    run_exposed,
    set_input,
    write_weight_rows,
)
from .obs import compensate_obs

__all__ = ["Consumer", "compensate", "find_consumers"]  # find_consumers lives in layers.py

logger = logging.getLogger(__name__)

#: Calibration samples used by least squares (Gemm/MatMul consumers fit one row per sample).
MAX_SAMPLES = 512


def compensate(original: onnx.ModelProto, pruned: onnx.ModelProto, consumers: list[Consumer],
               mode: str, calibration: Calibration | None) -> tuple[onnx.ModelProto, list[str]]:
    """Return a compensated copy of ``pruned`` and notes on what was (not) done."""
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    notes: list[str] = []
    if mode == "none" or not consumers:
        return model, notes
    if mode in ("lstsq", "obs", "sequential") and calibration is None:
        notes.append(f"{mode} needs --calibration data; used bias compensation instead")
        mode = "bias"
    fits = []
    if mode == "sequential":
        reason = sequential.unavailable(original, model)
        if reason:
            notes.append(f"sequential: the torch executor has no rule for {reason}; "
                         f"obs update instead")
            mode = "obs"
        else:  # what the fit cannot take gets the bias fold before the walk
            fits, unfit, unfit_notes = sequential.split_fittable(model, consumers)
            if sequential.REFIT_DOWNSTREAM:
                fits += sequential.downstream_refits(original, model, consumers, fits)
            consumers = unfit
            notes.extend(unfit_notes)
    if mode == "obs":  # the closed-form update; what it cannot serve gets the bias fold
        consumers = compensate_obs(original, model, consumers, calibration)
        notes.extend(f"{c.node}: obs update not applicable; bias compensation instead"
                     for c in consumers)
    means = _input_means(original, consumers, calibration) if calibration is not None else {}
    targets: dict[str, np.ndarray] = {}
    if mode == "lstsq":  # every consumer's original output, in one run
        calibration = first_samples(calibration, MAX_SAMPLES)
        names = [node_named(original, c.node).output[0] for c in consumers]
        targets = dict(zip(names, run_exposed(original, names, calibration)))
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
    if fits:
        notes.extend(sequential.refit_sequentially(original, model, fits, calibration))
    _drop_unused_initializers(model)
    return model, notes


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Replaced weights and biases are no longer read by any node: remove them, whether stored
    as initializers or as ``Constant`` nodes (paddle2onnx stores every weight that way)."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    for node in model.graph.node:  # names read inside subgraphs
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                used |= {n for sub in attribute.g.node for n in sub.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    nodes = [n for n in model.graph.node
             if n.op_type != "Constant" or any(o in used for o in n.output)]
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


# ---- bias ----
def _input_means(original, consumers, calibration) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(c.input for c in consumers))
    values = run_exposed(original, names, calibration)
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
    gamma, beta = constant(original, node.input[1]), constant(original, node.input[2])
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
    onode = node_named(original, consumer.node)
    pnode = node_named(model, consumer.node)
    weight = constant(original, onode.input[1])
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
        kn = w.T if attr(onode, "transB", 0) else w
        delta = mu_removed @ kn[consumer.removed]
        delta *= attr(onode, "alpha", 1.0) / attr(onode, "beta", 1.0)
        bias_index, out_dtype = 2, weight.dtype
    else:  # MatMul: fold into an exclusive bias Add that follows
        delta = mu_removed @ w[consumer.removed]
        if consumer.kept_out is not None:
            delta = delta[consumer.kept_out]
        _fold_into_following_add(model, pnode, delta, notes)
        return
    if consumer.kept_out is not None:
        delta = delta[consumer.kept_out]
    bias = constant(model, pnode.input[bias_index]) if len(pnode.input) > bias_index and \
        pnode.input[bias_index] else np.zeros(len(delta), dtype=out_dtype)
    if bias.shape != delta.shape:
        notes.append(f"{consumer.node}: bias of shape {bias.shape} not compensated")
        return
    set_input(model, pnode, bias_index, (bias.astype(np.float64) + delta).astype(out_dtype),
               "_compensated_bias")


def _fold_into_following_add(model, node, delta, notes) -> None:
    users = [n for n in model.graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = 1 if add.input[0] == node.output[0] else 0
        bias = constant(model, add.input[other])
        if bias is not None and bias.shape[-1:] == delta.shape:
            new = (bias.astype(np.float64) + delta).astype(bias.dtype)
            set_input(model, add, other, new, "_compensated_bias")
            return
    notes.append(f"{node.name}: MatMul without an exclusive bias Add; not compensated")


# ---- lstsq ----
def _refit(original, model, consumer: Consumer, calibration, targets) -> bool:
    """Refit one consumer's weights/bias; False when the form is not supported (use bias)."""
    pnode = node_named(model, consumer.node)
    onode = node_named(original, consumer.node)
    weight = constant(model, pnode.input[1])
    if weight is None or weight.dtype.kind != "f":
        return False
    x = run_exposed(model, [pnode.input[0]], calibration)[0].astype(np.float64)
    y = targets[onode.output[0]].astype(np.float64)
    if consumer.op == "Conv":
        if not fits_conv(pnode, weight):
            return False
        samples = conv_samples(y.shape)
        x, y = x[:samples], y[:samples]  # enough rows; unfolding everything costs GBs
    a, target = design_rows(pnode, weight, x), output_rows(pnode, y)
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
    write_weight_rows(model, pnode, weight, w_fit.T, b_fit)
    return True

"""The oracle's view of QDQ models: weights masked at their zero point, activation pairs bypassed.

Removing a channel from a quantized layer equals setting its consumer weights to their zero
point (``DequantizeLinear`` then yields exact zeros). Activation ``QuantizeLinear`` ->
``DequantizeLinear`` pairs round every intermediate result to a grid, so the pruned model (which
sums fewer terms, in another order) may land one step away after any layer; that is the nature of
quantized arithmetic, not a pruning error. Verification therefore compares the two models with
those pairs *bypassed* (float, strict tolerance) and, separately, runs the real quantized models
and reports the largest output difference in quantization steps.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..deps.constants import ConstantFolder, quantizer_of

#: A masking function: (stored array, fill value broadcastable to it) -> masked copy.
Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def mask_input(graph: gs.Graph, node: gs.Node, index: int, mask: Mask,
               consts: ConstantFolder, name: str, zero: np.ndarray | None = None) -> bool:
    """Give ``node.inputs[index]`` a masked private copy of its stored weight.

    A float constant gets zeros; a quantized one (``DequantizeLinear(W_q)``) gets its zero point
    in the stored integers, behind a private copy of each quantizer of its chain (``Quantize
    Linear`` of a float constant: the float gets zeros, which quantize to the zero point).
    ``zero`` is the fill of a stored integer weight read directly (QOperator layers: their
    zero point). Returns False when the input is not stored (a product of two activations).
    """
    tensor = node.inputs[index]
    quantizer = quantizer_of(tensor)
    if quantizer is None:
        value = consts.value(tensor)
        if value is None:
            return False
        fill = np.zeros((), value.dtype) if zero is None else zero
        node.inputs[index] = gs.Constant(name, mask(np.asarray(value), fill))
        return True
    out = quantizer.outputs[0]
    copy = gs.Node(quantizer.op, f"{quantizer.name}__{name}", dict(quantizer.attrs),
                   list(quantizer.inputs), [gs.Variable(f"{out.name}__{name}", dtype=out.dtype)],
                   domain=quantizer.domain)
    graph.nodes.append(copy)
    node.inputs[index] = copy.outputs[0]
    if quantizer.op == "DequantizeLinear" and quantizer_of(quantizer.inputs[0]) is None:
        stored = np.asarray(consts.value(quantizer.inputs[0]))
        copy.inputs[0] = gs.Constant(f"{name}_q", mask(stored, _zero_point(quantizer, stored,
                                                                           consts)))
        return True
    return mask_input(graph, copy, 0, mask, consts, f"{name}_in")


def _zero_point(quantizer: gs.Node, stored: np.ndarray, consts: ConstantFolder) -> np.ndarray:
    """The zero point of each entry of ``stored``, broadcastable to it."""
    zero = consts.value(quantizer.inputs[2]) if len(quantizer.inputs) > 2 and \
        quantizer.inputs[2] is not None and quantizer.inputs[2].name else None
    if zero is None:
        return np.zeros((), stored.dtype)
    zero = np.asarray(zero, dtype=stored.dtype)
    if zero.size == 1:
        return zero.reshape(())
    axis = int(quantizer.attrs.get("axis", 1)) % stored.ndim
    shape = [1] * stored.ndim
    shape[axis] = zero.size
    return zero.reshape(shape)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def activation_pairs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``DequantizeLinear`` nodes that read a ``QuantizeLinear`` of a computed activation."""
    producers = _producers(model)
    stored = {t.name for t in model.graph.initializer}
    pairs = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source = producers.get(q.input[0])
        if q.input[0] in stored or (source is not None and source.op_type == "Constant"):
            continue  # a fake-quantized weight, not an activation
        pairs.append(node)
    return pairs


def bypass_activation_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every activation Q -> DQ pair is an ``Identity`` of the float input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = _producers(out)
    for node in activation_pairs(out):
        source = producers[node.input[0]].input[0]
        del node.input[:]
        node.input.append(source)
        node.op_type = "Identity"
        del node.attribute[:]
    _drop_unused(out)
    return out


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is read (the bypassed QuantizeLinear nodes)."""
    while True:
        read = {name for node in model.graph.node for name in node.input}
        read |= {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


def output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """The quantization step of each graph output produced by a per-tensor DequantizeLinear
    (or 1 for an integer output of a QuantizeLinear); outputs without a grid are left out."""
    producers = _producers(model)
    stored = {t.name: t for t in model.graph.initializer}
    steps = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is None:
            continue
        if node.op_type == "QuantizeLinear":
            steps[output.name] = 1.0
        elif node.op_type == "DequantizeLinear" and node.input[1] in stored:
            scale = onnx.numpy_helper.to_array(stored[node.input[1]])
            if scale.size == 1:
                steps[output.name] = float(scale.reshape(()))
    return steps


def max_steps(names: list[str], steps: dict[str, float], expected: list, got: list) -> float | None:
    """The largest |got - expected| in quantization steps over outputs that have a step."""
    worst = None
    for name, want, have in zip(names, expected, got):
        if name not in steps or np.shape(want) != np.shape(have):
            continue
        diff = np.abs(np.asarray(want, np.float64) - np.asarray(have, np.float64))
        value = float(diff.max(initial=0.0)) / steps[name]
        worst = value if worst is None else max(worst, value)
    return worst

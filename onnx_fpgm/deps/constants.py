"""Constant values behind tensors: initializers, ``Constant`` nodes, and small constant subgraphs.

Exporters hide weights in many ways (PaddlePaddle keeps every weight in a ``Constant`` node,
mixed-precision exports put a ``Cast`` in front, others an ``Identity``; per-channel constants are
sometimes computed by a ``Reshape``/``Mul``/``Sqrt`` chain). The folder evaluates such chains with
onnx's reference evaluator, one node at a time, so the analysis can see the values.

Quantized weights are seen through too: ``DequantizeLinear(W_q, scale, zero_point)`` (QDQ
models) and ``DequantizeLinear(QuantizeLinear(W))`` (fake-quantized exports) over stored constants
fold to the float weights they stand for, so every handler scores and consumes them like float
weights; ``quantizer_of`` names the node the rewrite slices through. Blocked quantization
(``block_size``) is not folded: such a layer is left whole, with ``weight_reason`` saying why.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

#: Ops evaluated when all their inputs are constant (deterministic, cheap, no subgraphs).
FOLDABLE_OPS = frozenset({
    "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Concat",
    "Expand", "Slice", "Gather", "Mul", "Add", "Sub", "Div", "Sqrt", "Pow", "Neg", "Reciprocal",
    "Abs", "Exp", "Log", "ConstantOfShape", "Range", "Shape", "Tile", "Sigmoid", "Relu", "Clip",
    "Max", "Min", "Sum", "ReduceSum", "ReduceMean", "ReduceProd", "CastLike",
    # index arithmetic of gathered per-head tables (Swin's relative position bias, torch.export)
    "GatherND", "GatherElements", "Where", "Less", "Greater", "Equal", "Not", "Mod",
})
#: Quantize/dequantize ops folded over constants (per-tensor and per-axis; never blocked).
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Larger results are not folded (weights are stored, not computed, in real models).
MAX_FOLD_ELEMENTS = 1 << 24


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value a ``Constant`` node holds, whichever attribute it uses."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def root_constant(tensor: gs.Tensor) -> tuple[gs.Tensor | gs.Node, list[gs.Node]] | None:
    """Follow ``Identity``/``Cast`` back to an initializer or a ``Constant`` node.

    Returns the root (a ``gs.Constant`` or the ``Constant`` node) and the chain of nodes between
    root and ``tensor``, or None if the tensor is not such a stored constant.
    """
    chain: list[gs.Node] = []
    current = tensor
    while True:
        if isinstance(current, gs.Constant):
            return current, chain
        if len(current.inputs) != 1:
            return None
        node = current.inputs[0]
        if node.op == "Constant" and constant_node_value(node) is not None:
            return node, chain
        if node.op in ("Identity", "Cast") and len(node.inputs) == 1:
            chain.insert(0, node)
            current = node.inputs[0]
            continue
        return None


class ConstantFolder:
    """Evaluates and caches constant tensors of one graph."""

    def __init__(self, opset: int, overridable: frozenset[str] = frozenset()) -> None:
        self.opset = opset
        #: Initializers that are also graph inputs (IR >= 4): defaults a caller may override,
        #: so their values are not constants.
        self.overridable = overridable
        self._cache: dict[str, np.ndarray | None] = {}

    def assume(self, name: str, value: np.ndarray) -> None:
        """Take the tensor ``name`` to hold ``value`` (a Shape's output at chosen sizes)."""
        self._cache[name] = np.asarray(value)

    def value(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        if tensor is None or tensor.name in self.overridable:
            return None
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        if not tensor.name:
            return None
        if tensor.name in self._cache:
            return self._cache[tensor.name]
        self._cache[tensor.name] = None  # guards cycles in malformed graphs
        result = self._evaluate(tensor)
        self._cache[tensor.name] = result
        return result

    def _evaluate(self, tensor: gs.Tensor) -> np.ndarray | None:
        if len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op == "Constant":
            return constant_node_value(node)
        if node.domain not in ("", "ai.onnx", None) or not (
                node.op in FOLDABLE_OPS or (node.op in QUANTIZE_OPS and not block_size(node))):
            return None
        inputs = []
        for inp in node.inputs:
            if inp is None or not inp.name:
                inputs.append(None)
                continue
            if node.op == "CastLike" and inp is node.inputs[1] and inp.dtype is not None:
                inputs.append(np.zeros((), dtype=inp.dtype))  # only its dtype matters
                continue
            if node.op == "Shape" and inp.shape is not None and all(
                isinstance(d, int) for d in inp.shape
            ):
                inputs.append(np.zeros(inp.shape, dtype=np.float32))
                continue
            value = self.value(inp)
            if value is None:
                return None
            inputs.append(value)
        return self._run_node(node, inputs, tensor)

    def _run_node(self, node: gs.Node, inputs: list, tensor: gs.Tensor) -> np.ndarray | None:
        if node.op in QUANTIZE_OPS:  # the reference evaluator has them from opset 19 only
            return quantize_value(node, inputs)
        from onnx.reference import ReferenceEvaluator

        names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
        outputs = [f"o{k}" for k in range(len(node.outputs))]
        attrs = {}
        for key, val in node.attrs.items():
            if isinstance(val, gs.Graph):
                return None
            # a tensor attribute (ConstantOfShape's ``value``, as TorchScript writes it)
            attrs[key] = numpy_helper.from_array(np.asarray(val.values)) \
                if isinstance(val, gs.Constant) else val
        try:
            proto = helper.make_node(node.op, names, outputs, **attrs)
            model = helper.make_model(
                helper.make_graph(
                    [proto], "fold",
                    [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                     for n in names if n],
                    [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                     for o in outputs],
                ),
                opset_imports=[helper.make_opsetid("", self.opset)],
            )
            feeds = {n: v for n, v in zip(names, inputs) if n}
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception as err:  # unfoldable: the caller treats the tensor as non-constant
            logger.debug("cannot fold %s (%s): %s", node.name, node.op, err)
            return None
        index = [o.name for o in node.outputs].index(tensor.name)
        value = np.asarray(results[index])
        if value.size > MAX_FOLD_ELEMENTS:
            return None
        return value


def quantize_value(node: gs.Node, inputs: list) -> np.ndarray | None:
    """Quantize/DequantizeLinear (per-tensor or per-axis, integer types) as onnxruntime does it.

    None for types we do not evaluate (float8, int4): the weight is then not a constant.
    """
    data, scale = np.asarray(inputs[0]), np.asarray(inputs[1])
    zero = np.asarray(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    if scale.size > 1:
        if scale.ndim != 1:
            return None
        shape = [1] * data.ndim
        shape[int(node.attrs.get("axis", 1)) % data.ndim] = scale.size
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero is not None else None
    if node.op == "DequantizeLinear":
        if data.dtype.kind not in "iu":
            return None
        shifted = data.astype(np.int32) - (zero.astype(np.int32) if zero is not None else 0)
        return (shifted.astype(scale.dtype) * scale).astype(scale.dtype)
    dtype = zero.dtype if zero is not None else np.dtype(np.uint8)
    if dtype.kind not in "iu" or "output_dtype" in node.attrs or "saturate" in node.attrs:
        return None
    info = np.iinfo(dtype)
    values = np.rint(data.astype(np.float32) / scale) + (zero if zero is not None else 0)
    return np.clip(values, info.min, info.max).astype(dtype)


def block_size(node: gs.Node) -> int:
    """The ``block_size`` of a blocked (opset 21) Quantize/DequantizeLinear; 0 otherwise."""
    return int(node.attrs.get("block_size", 0) or 0)


def quantizer_of(tensor: gs.Tensor | None) -> gs.Node | None:
    """The Quantize/DequantizeLinear producing ``tensor`` from a stored constant, or None.

    Its data input may itself be quantized (``DequantizeLinear(QuantizeLinear(W))``); scale and
    zero point must be stored constants too (checked by the caller's folding).
    """
    if tensor is None or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op not in QUANTIZE_OPS or node.domain not in ("", "ai.onnx", None) or \
            not node.inputs or node.inputs[0] is None:
        return None
    data = node.inputs[0]
    if root_constant(data) is None and quantizer_of(data) is None:
        return None
    return node


def weight_reason(tensor: gs.Tensor | None) -> str:
    """Why a weight is not a constant we can slice (appended to a handler's reason)."""
    if tensor is None or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return ""
    source = tensor.inputs[0]
    if source.op in QUANTIZE_OPS and block_size(source):
        return (f" (blocked quantization by {source.op} {source.name}, block_size="
                f"{block_size(source)}: scales are shared by blocks of input rows)")
    return f" (computed by {source.op} {source.name})"


def fold_constant_shapes(graph: gs.Graph) -> int:
    """Replace ``Shape`` of a stored constant by its value (unoptimised exports read weight shapes).

    Without this, a weight read by ``Shape`` (torch.export's zero bias: ``Expand(0,
    Shape(W)[0])``) has two consumers and could only be sliced as a copy, leaving the original
    in the model. Returns the number of folded nodes.
    """
    outputs = {t.name for t in graph.outputs}
    folded = 0
    for node in graph.nodes:
        if node.op != "Shape" or not node.inputs or node.outputs[0].name in outputs:
            continue
        if root_constant(node.inputs[0]) is None or node.inputs[0].shape is None:
            continue
        shape = np.array(node.inputs[0].shape, dtype=np.int64)
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        value = shape[start:end]
        out = node.outputs[0]
        constant = gs.Constant(out.name, value)
        for consumer in list(out.outputs):
            consumer.inputs = [constant if t is out else t for t in consumer.inputs]
        node.outputs.clear()
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded

"""Output shapes onnx's whole-model inference left unknown, inferred node by node.

onnx's inference stops at a value it cannot fold: a Reshape whose target is computed (tf2onnx's
computed Flatten), a Pad whose pads are computed from the input's dims (TorchScript's
``F.pad`` to a window multiple in Swin: ``(w - W % w) % w``). Handlers that find such a shape
mark the tensor in ``ctx.refined``; nodes reading a refined tensor, or a computed shape
parameter the analysis' constant folder can evaluate, get their outputs inferred here.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)


def unknown_dim(dim) -> bool:
    """A dim nobody named: None, or one of onnx's own ``unk__N`` stand-ins for a dim its
    inference could not find (never an input's symbol)."""
    return dim is None or (isinstance(dim, str) and dim.startswith("unk__"))


def _computed_constant(tensor: gs.Tensor | None, ctx) -> bool:
    """A short integer vector computed by nodes (not stored) that the folder evaluates."""
    if not isinstance(tensor, gs.Variable) or not tensor.inputs or tensor.shape is None or \
            len(tensor.shape) > 1 or tensor.inputs[0].op == "Constant":
        return False
    value = ctx.const(tensor)
    return value is not None and value.dtype.kind in "iu"


def refine_shapes(node: gs.Node, ctx) -> None:
    """Infer ``node``'s unknown output shapes with onnx when an input's shape was refined or
    a computed shape parameter folds to a constant (the values are given to onnx's inference).
    """
    if all(t.shape is not None and not any(map(unknown_dim, t.shape)) for t in node.outputs):
        return
    if not any(t is not None and t.name in ctx.refined for t in node.inputs) and \
            not any(_computed_constant(t, ctx) for t in node.inputs):
        return
    try:
        schema = onnx.defs.get_schema(node.op, ctx.opset, node.domain or "")
        proto = onnx.helper.make_node(node.op, [t.name if t is not None else "" for t in
                                                node.inputs],
                                      [t.name for t in node.outputs], **{
                                          k: v for k, v in node.attrs.items()
                                          if not isinstance(v, (gs.Constant, gs.Graph))})
        types, data = {}, {}
        for tensor in node.inputs:
            if tensor is None or not tensor.name or tensor.dtype is None:
                continue
            dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            types[tensor.name] = onnx.helper.make_tensor_type_proto(dtype, tensor.shape)
            value = ctx.const(tensor) if tensor.shape is not None and len(tensor.shape) <= 1 \
                else None
            if value is not None:
                data[tensor.name] = onnx.numpy_helper.from_array(np.asarray(value), tensor.name)
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data,
            opset_imports=[onnx.helper.make_opsetid(node.domain or "", ctx.opset)])
    except Exception as err:  # best effort: handlers block what stays unknown
        logger.debug("no shape inference for %s (%s): %s", node.name, node.op, err)
        return
    for out in node.outputs:
        ttype = inferred.get(out.name)
        if (out.shape is None or any(map(unknown_dim, out.shape))) and ttype is not None and \
                ttype.tensor_type.HasField("shape"):
            found = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in ttype.tensor_type.shape.dim]
            if out.shape is not None and len(out.shape) == len(found):  # fill unknown dims
                found = [f if unknown_dim(d) and f is not None else d
                         for d, f in zip(out.shape, found)]
            out.shape = found
            if out.dtype is None and ttype.tensor_type.elem_type:
                out.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.tensor_type.elem_type)
            ctx.refined.add(out.name)

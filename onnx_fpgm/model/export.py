"""Exporting a rewritten graph-surgeon graph as the pruned model.

graph-surgeon writes the newest IR version and its own view of the interface, so the IR
version, opsets, producer fields, metadata and declared input/output types of the input are
carried over explicitly; big constants are written without graph-surgeon's extra copies.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ..errors import RewriteError
from .io import _first_line, light_copy
from .outer_scope import hoist_outer_constants, with_bodies


def export_graph(graph: gs.Graph, like: onnx.ModelProto,
                 metadata: dict[str, str] | None = None,
                 resized: dict[str, dict[int, int]] | None = None) -> onnx.ModelProto:
    """Export ``graph`` with the IR version, opsets and metadata of ``like``; infer shapes.

    Inner shapes of the graph and of its If/Loop/Scan bodies (which the rewrite may have
    changed) are dropped and inferred anew; the interfaces, a body's too, keep theirs, but for
    ``resized`` (see ``restore_interface_types``)."""
    parts = list(with_bodies(graph))
    io_names = {t.name for part in parts for t in (*part.inputs, *part.outputs)}
    for part in parts:
        for tensor in part.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in io_names:
                tensor.shape = None
                tensor.dtype = None
    model = export_onnx(graph)
    hoist_outer_constants(model, like)
    restore_interface_types(model, like, resized)
    _restore_initializer_inputs(model, like)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    if len(like.functions) and not len(model.functions):
        model.functions.extend(like.functions)
    for key, value in (metadata or {}).items():
        onnx.helper.set_model_props(model, {**_props(model), key: value})
    del model.graph.value_info[:]
    try:  # on a light copy: the weights are neither copied nor serialised again
        inferred = onnx.shape_inference.infer_shapes(light_copy(model), data_prop=True)
    except Exception as err:
        raise RewriteError(f"shape inference failed on the pruned model: {_first_line(err)}") \
            from err
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


#: Constants of this many bytes or more are written into the exported model directly.
_DIRECT_EXPORT_BYTES = 1 << 20


def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx``, with the data of big constants written into the final model, and
    without its warning per pair of nodes sharing a name (the input's names, kept; it prints
    both nodes' tensors in full: pages on stderr for some shipped models).

    graph-surgeon builds each initializer, then copies the list into a graph and the graph into
    the model: three copies of the weights alive at once (2.7 GiB for 1.2 GiB of pruned
    weights). Big constants are exported empty and filled in place afterwards, one at a time.
    """
    held: dict[str, tuple[gs.Constant, np.ndarray]] = {}
    for name, tensor in graph.tensors().items():
        values = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and isinstance(values, np.ndarray) and \
                values.nbytes >= _DIRECT_EXPORT_BYTES and values.dtype.kind in "fiub" and \
                _exported_as_is(tensor, values.dtype):
            held[name] = (tensor, values)
            tensor.values = np.empty((0,), values.dtype)
    severity = G_LOGGER.severity
    G_LOGGER.severity = max(severity, G_LOGGER.ERROR)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        G_LOGGER.severity = severity
        for tensor, values in held.values():
            tensor.values = values
    for init in model.graph.initializer:
        if init.name in held:
            values = held[init.name][1]
            del init.dims[:]
            init.dims.extend(values.shape)
            init.raw_data = np.ascontiguousarray(values).astype(
                values.dtype.newbyteorder("<"), copy=False).tobytes()
    return model


def _exported_as_is(tensor: gs.Constant, dtype: np.dtype) -> bool:
    """The constant is exported in its own dtype (no ``export_dtype`` conversion)."""
    target = tensor.export_dtype
    try:
        return (target == onnx.helper.np_dtype_to_tensor_dtype(dtype)) if isinstance(target, int) \
            else np.dtype(target) == dtype
    except (TypeError, KeyError, ValueError):
        return False


def restore_interface_types(model: onnx.ModelProto, like: onnx.ModelProto,
                            resized: dict[str, dict[int, int]] | None = None) -> None:
    """Graph inputs and outputs exactly as ``like`` declares them, but for ``resized``: name ->
    {axis: new size} of a KV cache that shrank with its heads or head dims
    (``--allow-interface-change``).

    graph-surgeon takes a tensor's type from ``value_info`` when the name is listed there too,
    and IR < 7 models (onnxruntime's quantize_dynamic output) may list graph outputs in
    ``value_info`` without a shape: the export would then lose the declared shape.
    """
    declared = {v.name: v for v in (*like.graph.input, *like.graph.output)}
    for value in (*model.graph.input, *model.graph.output):
        if value.name in declared:
            value.CopyFrom(declared[value.name])
        dims = value.type.tensor_type.shape.dim
        for axis, size in (resized or {}).get(value.name, {}).items():
            if axis < len(dims):
                dims[axis].ClearField("dim_param")
                dims[axis].dim_value = size


def _restore_initializer_inputs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """graph-surgeon drops initializers from the graph inputs; put them back in their order."""
    present = {v.name: v for v in model.graph.input}
    initializers = {t.name: t for t in model.graph.initializer}
    if all(v.name in present for v in like.graph.input):
        return
    inputs = []
    for value in like.graph.input:
        if value.name in present:
            inputs.append(present[value.name])
        elif value.name in initializers:
            init = initializers[value.name]
            restored = onnx.ValueInfoProto()
            restored.CopyFrom(value)
            dims = restored.type.tensor_type.shape.dim
            if len(dims) == len(init.dims):  # an IR < 4 weight may have been pruned
                for dim, size in zip(dims, init.dims):
                    dim.ClearField("dim_param")
                    dim.dim_value = size
            inputs.append(restored)
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}

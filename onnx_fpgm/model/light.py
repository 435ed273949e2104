"""The model without its weight data: what shape inference and the checker need, cheaply.

Neither reads float weight values, but both take a serialised model, and serialising (or
checking) the full model copies every weight again: 1.1 s and 1x the weights on a 531 MB VGG.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .runtime_ops import move_to_private_domain

#: External-data location of the stubs that stand for stripped weights.
STRIPPED = "__stripped__"
_KEPT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.STRING,
               onnx.TensorProto.UNDEFINED)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with stubs for its weights' data (shapes and small int constants kept).

    Initializers of more than 64 elements become external-data stubs, except int32/int64
    ones (shapes, indices: inference reads their values) and strings (never external).
    Shape inference needs weight shapes, not values; copying and serialising a light model
    instead of the full one saves a copy of the weights.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    for node in graph.node:
        if node.op_type == "Constant":
            _as_value_tensor(node)
    _stub_body_references(light)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    for init in model.graph.initializer:
        if not is_stripped(init):
            graph.initializer.append(init)
        else:
            stub = graph.initializer.add()
            stub.name = init.name
            stub.data_type = init.data_type
            stub.dims.extend(init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL  # no data; inference reads dims only
            entry = stub.external_data.add()
            entry.key, entry.value = "location", STRIPPED
    return light


def _stub_body_references(light: onnx.ModelProto) -> None:
    """External data inside nodes (If/Loop bodies of a mapped input) point at the stub file:
    the light copy is checked in another folder; that data is checked where it lies when read
    (the checker on the input's path, ``external`` on save)."""
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(light):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", STRIPPED


def is_stripped(init: onnx.TensorProto) -> bool:
    """``light_copy`` replaces this initializer's data by a stub (see its docstring)."""
    return init.data_type not in _KEPT_TYPES and _numel(init) > 64


def _as_value_tensor(node: onnx.NodeProto) -> None:
    """Rewrite value_float(s)/value_int(s) as a ``value`` tensor (some tools read only that)."""
    for attr in node.attribute:
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = np.array(onnx.helper.get_attribute_value(attr),
                             dtype=np.float32 if "float" in attr.name else np.int64)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute(
                "value", onnx.numpy_helper.from_array(value)))
            return


def _numel(tensor: onnx.TensorProto) -> int:
    numel = 1
    for d in tensor.dims:
        numel *= d
    return numel


def check_light(model: onnx.ModelProto, *, full_check: bool = False,
                runtime_ops: list[str] | None = None) -> None:
    """``onnx.checker.check_model`` on the light copy, from a folder that holds its stub file.

    Everything but the stripped tensors' data is checked as on the full model; their data
    sizes are not (whoever reads that data checks it: ``mapped.embedded_arrays``). Without
    room for the light copy in the temporary folder, the model is checked in memory.
    ``runtime_ops`` (ops onnxruntime registers in the default domain and onnx does not know:
    ``runtime_ops.runtime_only_ops``) are checked as custom ops, i.e. not by onnx; external
    tensors then count as stubs too (a header of memory-mapped data).

    Raises:
        onnx.checker.ValidationError: as the checker.
    """
    light = light_copy(model)
    if runtime_ops:
        move_to_private_domain(light, runtime_ops)
        for init in light.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                del init.external_data[:]
                entry = init.external_data.add()
                entry.key, entry.value = "location", STRIPPED
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="onnx-fpgm-check-"))
        (folder / STRIPPED).touch()
        path = folder / "model.onnx"
        path.write_bytes(light.SerializeToString())
    except OSError:
        path = None
    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=full_check)
        elif model.ByteSize() < 2**31 - (1 << 24):
            onnx.checker.check_model(light if runtime_ops else model, full_check=full_check)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

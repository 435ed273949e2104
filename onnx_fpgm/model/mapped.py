"""Loading big models with their weights memory-mapped from the external data file.

Reading external data into the protobuf and then into NumPy costs two copies of the weights
(protobuf fields cannot be viewed in place). Here the header is loaded alone and every large
float initializer becomes a read-only view of the data file: no copy until read, and then one
file-backed copy shared by every view (issue 12's memory budget). Weights stored in the
protobuf are viewed in place too, and the model is checked without serialising them.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelLoadError
from . import external
from .io import _first_line, _itemsize, check_runtime_ops, check_tensors, load_model
from .light import _numel, is_stripped

#: Inputs whose external data reach this many bytes are memory-mapped, not read (``load_mapped``).
MAP_EXTERNAL_BYTES = 1 << 26
#: Directory external data of the model being pruned is read from (sessions built from bytes).
EXTERNAL_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "onnx_fpgm_external_dir", default=None)


@dataclass
class Loaded:
    """A model to prune: the protobuf, plus its big weights as read-only arrays.

    Attributes:
        model: the model; with ``directory``, its big initializers still reference external data.
        external: the input stored its weights as external data.
        weights: initializer name -> read-only array, mapped from the external data file
            (with ``directory``) or viewing the protobuf's raw data.
        directory: where ``model``'s external data lives (set when mapped).
        files: the model file and its external data files (the run's reads; none for a
            ``ModelProto``).
    """

    model: onnx.ModelProto
    external: bool
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    directory: Path | None = None
    files: tuple[Path, ...] = ()

    def read_files(self) -> list[tuple[str, Path]]:
        """(role, path) of the files read, for ``files.FilePlan``."""
        return [("IN" if i == 0 else "IN's data file", p) for i, p in enumerate(self.files)]


@contextlib.contextmanager
def reading_from(loaded: Loaded) -> Iterator[None]:
    """Meanwhile, sessions built from ``loaded.model`` read its mapped data from its folder."""
    token = EXTERNAL_DIR.set(loaded.directory)
    try:
        yield
    finally:
        EXTERNAL_DIR.reset(token)


def with_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its mapped weights read into the protobuf, for code that reads them there
    (compensation); ``model`` itself when it has none, or outside ``reading_from``."""
    directory = EXTERNAL_DIR.get()
    if directory is None or not any(t.data_location == onnx.TensorProto.EXTERNAL
                                    for t in model.graph.initializer):
        return model
    from onnx.external_data_helper import load_external_data_for_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    load_external_data_for_model(copy, str(directory))
    return copy


def load_mapped(source: str | os.PathLike | onnx.ModelProto) -> Loaded:
    """``io.load_model``, except that no weight is copied more than once.

    External data of ``MAP_EXTERNAL_BYTES`` or more is mapped; its header is checked by onnx's
    checker from its path (which reads no weights). Otherwise the file is parsed once, checked
    without its weights (``light.check_light``), and its big tensors are viewed in place
    (``embedded_arrays``).

    Raises:
        ModelLoadError: as ``load_model``.
    """
    if isinstance(source, onnx.ModelProto) or not Path(source).is_file():
        return _embedded(source)
    path = Path(source)
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:
        return Loaded(*load_model(source))  # load_model words the error
    check_tensors(header, str(path))
    data_files = tuple(path.parent / loc for loc in external.external_locations(header))
    loaded = _load_header(path, header)
    loaded.files = (path, *data_files)
    return loaded


def _load_header(path: Path, header: onnx.ModelProto) -> Loaded:
    external_tensors = [t for t in header.graph.initializer
                        if t.data_location == onnx.TensorProto.EXTERNAL]
    constants = (attr.t for node in header.graph.node for attr in node.attribute
                 if attr.type == onnx.AttributeProto.TENSOR)
    if sum(_numel(t) * _itemsize(t.data_type) for t in external_tensors) < MAP_EXTERNAL_BYTES \
            or any(t.data_location == onnx.TensorProto.EXTERNAL for t in constants) \
            or not len(header.graph.node) or not len(header.opset_import):
        return _embedded(path, header)
    try:
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as err:
            check_runtime_ops(header, str(path), err)
    except (onnx.checker.ValidationError, OSError, ValueError, RuntimeError) as err:
        # RuntimeError: the checker's filesystem errors (a location too long for the OS)
        raise ModelLoadError(f"{path}: fails onnx.checker: {_first_line(err)[:300]}") from err
    weights = _map_external(external_tensors, path.parent)
    for tensor in external_tensors:  # shapes, sizes, axes: inference and the folder read them inline
        value = weights[tensor.name]
        if value.dtype.kind != "f" or value.nbytes < _MAPPED_MIN_BYTES:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(value), tensor.name))
            del weights[tensor.name]
    return Loaded(header, True, weights, path.parent)


def _embedded(source: str | os.PathLike | onnx.ModelProto,
              header: onnx.ModelProto | None = None) -> Loaded:
    """A model whose weights live in the protobuf: light check, big tensors viewed in place."""
    model = source if isinstance(source, onnx.ModelProto) else header
    if model is None or any(is_stripped(t) and t.data_type not in _VIEWED_TYPES
                            for t in model.graph.initializer):
        return Loaded(*load_model(source, parsed=header))  # the full checker for rare types
    model, external = load_model(source, parsed=header, light_check=True)
    where = "the given model" if isinstance(source, onnx.ModelProto) else str(source)
    return Loaded(model, external, embedded_arrays(model, where))


#: Types whose raw data ``embedded_arrays`` views (others take the full checker's path).
_VIEWED_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.BOOL})


def embedded_arrays(model: onnx.ModelProto, where: str) -> dict[str, np.ndarray]:
    """Read-only arrays over the raw data of the initializers ``light_copy`` strips.

    One copy of each (protobuf fields cannot be viewed); graph-surgeon's own loader makes two.
    Checks what the light checker skipped: each data size must match the tensor's shape.

    Raises:
        ModelLoadError: a tensor's data does not match its shape.
    """
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if not is_stripped(tensor):
            continue  # checked by the light checker
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
        if not tensor.HasField("raw_data"):
            count = len(getattr(tensor, _TYPED_FIELD.get(tensor.data_type, "int32_data")))
            if count != _numel(tensor):
                raise ModelLoadError(f"{where}: fails onnx.checker: initializer {tensor.name} "
                                     f"holds {count} values, its shape needs {_numel(tensor)}")
            continue  # typed fields: graph-surgeon converts them when read
        raw = tensor.raw_data
        if len(raw) != _numel(tensor) * dtype.itemsize:
            raise ModelLoadError(f"{where}: fails onnx.checker: raw data of initializer "
                                 f"{tensor.name} holds {len(raw)} bytes, its shape needs "
                                 f"{_numel(tensor) * dtype.itemsize}")
        arrays[tensor.name] = np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))
    return arrays


_TYPED_FIELD = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
                onnx.TensorProto.INT64: "int64_data"}


#: Smaller (or non-float) external tensors are read into the model instead of mapped.
_MAPPED_MIN_BYTES = 4096


def _map_external(tensors: list[onnx.TensorProto], directory: Path) -> dict[str, np.ndarray]:
    """Each data file opened once, by descriptor after onnx's checks, and mapped from it."""
    maps: dict[str, object] = {}
    weights = {}
    try:
        for tensor in tensors:
            location = external.external_info(tensor).get("location", "")
            if location not in maps:
                data = external.open_data_file(directory, location, tensor.name)
                try:
                    maps[location] = (data, external.map_file(data))
                finally:
                    data.close()  # the map keeps its own reference to the file
            data, view = maps[location]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            offset, length = external.tensor_range(tensor, data, _numel(tensor) * dtype.itemsize)
            weights[tensor.name] = np.frombuffer(view, np.uint8, length, offset).view(
                dtype).reshape(tuple(tensor.dims))
    except OSError as err:
        raise ModelLoadError(f"external data in {directory}: cannot be mapped ({err})") from err
    return weights


def attach_weights(graph: gs.Graph, weights: dict[str, np.ndarray]) -> None:
    """Give the graph's constants their mapped arrays (instead of unreadable external stubs)."""
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) and name in weights:
            tensor.values = weights[name]
            tensor.data_location = None  # exported with its data, not as a dangling reference


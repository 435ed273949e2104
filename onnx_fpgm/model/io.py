"""Loading, checking and saving models; the graph-surgeon import (the export: ``export.py``)."""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import Message

from ..errors import ExportError, ModelLoadError
from .light import _numel, check_light, light_copy  # noqa: F401  (io.light_copy for callers)
from .outer_scope import all_graphs, proto_with_bodies, with_bodies
from .runtime_ops import runtime_only_ops

#: Protobuf refuses to serialise a single message above 2 GiB.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(source: str | os.PathLike | onnx.ModelProto, *,
               parsed: onnx.ModelProto | None = None,
               light_check: bool = False) -> tuple[onnx.ModelProto, bool]:
    """Read a model (with external data) and check it is a valid ONNX model.

    Args:
        parsed: ``source``'s file already parsed without its external data (not read again).
        light_check: run the checker on ``light.light_copy`` (no copy of the weights); the
            caller then checks the stripped tensors' data sizes (``mapped.embedded_arrays``).

    Returns:
        The model and whether its weights were stored as external data.

    Raises:
        ModelLoadError: missing, unreadable, empty or invalid file.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "the given model"
        external = has_external_data(model)
        if external:  # its data would be read relative to the current directory, if at all
            name = next(t.name for t in model.graph.initializer
                        if t.data_location == onnx.TensorProto.EXTERNAL)
            raise ModelLoadError(f"{where}: initializer {name} is external data that is not "
                                 "loaded; pass the model's path, or onnx.load() it with its data")
    else:
        path = Path(source)
        where = str(path)
        model, external = _read_file(path, parsed)
    if not model.HasField("graph") or not len(model.graph.node):
        raise ModelLoadError(f"{where}: not an ONNX model (no graph nodes)")
    check_tensors(model, where)
    if not len(model.opset_import):
        raise ModelLoadError(f"{where}: model declares no opset")
    try:
        if light_check:
            check_light(model)
        elif not too_large(model):
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        check_runtime_ops(model, where, err)
    release_free_memory()
    return model, external


def check_tensors(model: onnx.ModelProto, where: str) -> None:
    """Refuse tensors the analysis and onnxruntime cannot take, before any work.

    Sparse initializers (the analysis and the oracle read dense weights only), negative dims
    (``[-8, -3, 3, 3]`` holds 72 values by its product, yet no array has that shape), and a
    zero-sized weight of a Conv/Gemm/MatMul (an empty layer: onnxruntime's check of such a
    model does not return).

    Raises:
        ModelLoadError: naming the tensor and the reason.
    """
    from onnx.external_data_helper import _get_all_tensors

    sparse = model.graph.sparse_initializer
    if len(sparse):
        names = ", ".join(s.values.name for s in sparse[:3])
        raise ModelLoadError(f"{where}: {len(sparse)} sparse initializer(s) ({names}): onnx-fpgm "
                             "reads dense weights only; store them as dense initializers")
    for tensor in _get_all_tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{where}: tensor {tensor.name} has negative dims "
                                 f"{list(tensor.dims)}")
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in weights:
            dims = list(weights[node.input[1]].dims)
            if 0 in dims:
                raise ModelLoadError(f"{where}: {node.op_type} {node.name or node.output[0]} has "
                                     f"an empty weight {node.input[1]} {dims}")


_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def check_runtime_ops(model: onnx.ModelProto, where: str, err: Exception) -> None:
    """After the checker refused ``model`` (``err``): accept it when the refusal is only about
    ops onnxruntime registers (``runtime_ops``) and the rest passes.

    Raises:
        ModelLoadError: naming the checker's error (the first one when the rest fails too).
    """
    ops = runtime_only_ops(model)
    if ops:
        try:
            check_light(model, runtime_ops=ops)
            return
        except onnx.checker.ValidationError as again:
            err = again
    raise ModelLoadError(f"{where}: fails onnx.checker: {_first_line(err)}") from err


def _read_file(path: Path, parsed: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, bool]:
    """The file's model with its external data read in (``parsed``: its header, if at hand)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")
    try:
        model = parsed if parsed is not None else onnx.load(str(path), load_external_data=False)
        external = has_external_data(model)
        if external:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
    except Exception as err:  # protobuf raises assorted errors on random bytes
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(err)})") from err
    return model, external


def _itemsize(data_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError):
        return 8


def overridable_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers that are also graph inputs and stand for defaults a caller may override.

    Before IR 4 every initializer had to be listed as an input, and exporters of that time
    kept doing so at IR 4 and later (PyTorch 1.2, ``keep_initializers_as_inputs``, CenterFace):
    a model that lists *every* initializer among its inputs is that form, and its initializers
    are weights, as onnxsim takes them (it drops them from the inputs): none is overridable.
    Only a model that lists some of them chose those as overridable defaults.
    """
    listed = initializer_inputs(model)
    if model.ir_version < 4 or len(listed) == len(model.graph.initializer):
        return frozenset()
    return listed


def initializer_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers that are also listed among the graph inputs."""
    inputs = {v.name for v in model.graph.input}
    return frozenset(t.name for t in model.graph.initializer if t.name in inputs)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelLoadError("model imports no default-domain opset")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of stored tensors (initializers, Constant values; bodies' too), from their shapes
    and types.

    Reading ``raw_data`` (or ``ByteSize()``) would copy the data: 0.45 s on a 531 MB model.
    External tensors that were not loaded (``load_mapped``) count with their size too.
    """
    return sum(_numel(t) * _itemsize(t.data_type)
               for t in _stored_tensors(model, subgraphs=True))


def too_large(model: onnx.ModelProto) -> bool:
    """True when the model may not fit one protobuf message (2 GiB) once serialised."""
    return weight_bytes(model) + (1 << 24) >= PROTOBUF_LIMIT


def _stored_tensors(model: onnx.ModelProto, *, subgraphs: bool = False):
    """Initializers and tensor attributes of the top graph (``subgraphs``: of its bodies too,
    the weights of the layers in an If's branches)."""
    for graph in all_graphs(model.graph) if subgraphs else (model.graph,):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every tensor, as far as they can be known statically.

    onnx's inference (with data propagation) first; where it leaves dims unknown in a model
    with static inputs, which it does behind shape arithmetic such as TorchScript's ``chunk``
    (Shape -> Gather -> Div -> Slice), onnxruntime's symbolic shape inference is tried as well.
    Models with symbolic input dims are inferred at concrete sizes instead
    (``sized_shapes.infer_shapes_at``): the symbolic engine takes seconds on them (sympy), so it
    is not tried here. Best effort: handlers block whatever stays unknown.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    if not _has_unknown_dims(inferred) or too_large(model) or _has_symbolic_inputs(model):
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _in_temporary_directory():  # it may save a temp model into the working directory
            symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # the symbolic engine gives up on some graphs; keep onnx's answer
        return inferred
    if symbolic is None or not _agrees(symbolic, inferred, model):
        return inferred
    return symbolic if _unknown_count(symbolic) < _unknown_count(inferred) else inferred


def _has_symbolic_inputs(model: onnx.ModelProto) -> bool:
    return any(not d.HasField("dim_value") or d.dim_value < 0
               for v in model.graph.input for d in v.type.tensor_type.shape.dim)


@contextlib.contextmanager
def _in_temporary_directory():
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnx-fpgm-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(previous)


def _static_dims(value: onnx.ValueInfoProto) -> tuple | None:
    ttype = value.type.tensor_type
    if not ttype.HasField("shape") or not all(d.HasField("dim_value") for d in ttype.shape.dim):
        return None
    return tuple(d.dim_value for d in ttype.shape.dim)


def _agrees(symbolic: onnx.ModelProto, inferred: onnx.ModelProto,
            model: onnx.ModelProto) -> bool:
    """The symbolic engine must not contradict onnx's static shapes or the declared outputs
    (it mishandles some ops, e.g. Resize-18 with ``axes``)."""
    theirs = {v.name: _static_dims(v) for v in (*symbolic.graph.value_info,
                                                *symbolic.graph.output)}
    for value in (*inferred.graph.value_info, *model.graph.output):
        ours = _static_dims(value)
        if ours is not None and theirs.get(value.name, ours) not in (ours, None):
            return False
    return True


def _unknown_count(model: onnx.ModelProto) -> int:
    known = {v.name for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    missing = sum(1 for n in model.graph.node for o in n.output if o and o not in known)
    return missing + sum(
        1 for v in model.graph.value_info for d in v.type.tensor_type.shape.dim
        if not d.HasField("dim_value") and not d.dim_param.isidentifier()
        or d.dim_param.startswith("unk__"))


def _has_unknown_dims(model: onnx.ModelProto) -> bool:
    return _unknown_count(model) > 0


def import_graph(model: onnx.ModelProto, shapes: onnx.ModelProto | None = None) -> gs.Graph:
    """graph-surgeon graph of ``model``; tensor shapes/dtypes taken from ``shapes``' value_info
    (its If/Loop/Scan bodies' too, for the tensors inside them).

    Passing the light inferred model keeps one copy of the weights in memory.
    """
    graph = gs.import_onnx(model)
    if shapes is None:
        return graph
    infos = {v.name: v for g in proto_with_bodies(shapes.graph) for v in g.value_info}
    tensors = {name: t for g in with_bodies(graph) for name, t in g.tensors().items()}
    for name, tensor in tensors.items():
        info = infos.get(name)
        if info is None or not isinstance(tensor, gs.Variable) or tensor.shape is not None:
            continue
        ttype = info.type.tensor_type
        if ttype.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if ttype.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else
                            (d.dim_param or None) for d in ttype.shape.dim]
    return graph


def loaded_constants(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Arrays the graph's constants already hold (read by the analysis), by tensor name."""
    return {name: tensor._values for name, tensor in graph.tensors().items()
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray)}


def release_free_memory(collect: bool = False) -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed weight-sized blocks).

    glibc raises its mmap threshold after a large block is freed, so later tensors come from
    the heap, whose free space is not returned: after loading, a process held twice the
    weights although one copy was live. ``malloc_trim`` returns it; elsewhere a no-op.
    ``collect`` first frees what only reference cycles (a graph-surgeon graph) still hold.
    """
    if collect:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_pruned(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The pruned model must pass the checker: the full check, unless the original fails it too.

    Both are checked without their weight data (``check_light``): the pruned tensors were
    written from arrays of the right size, the original's were checked when it was loaded.
    The original is full-checked only when the pruned model fails.

    Raises:
        ExportError: the pruned model fails a check the original passes (our bug: exit 3).
    """
    ops = runtime_only_ops(original) or None  # checked as the input was at load
    try:
        check_light(model, full_check=True, runtime_ops=ops)
        return
    except Exception as err:
        full_error = err
    if passes_full_check(original, ops):
        raise ExportError(_internal(full_error)) from full_error
    try:
        check_light(model, runtime_ops=ops)
    except Exception as err:  # the input passed this check when it was loaded
        raise ExportError(_internal(err)) from err


def _internal(err: BaseException) -> str:
    return (f"internal error: the written model fails onnx.checker although the input passes "
            f"it ({_first_line(err)}); please report it")


def passes_full_check(model: onnx.ModelProto, runtime_ops: list[str] | None = None) -> bool:
    try:
        check_light(model, full_check=True, runtime_ops=runtime_ops)
    except Exception:
        return False
    return True


def copy_fields(source, target, skip: set[str] | frozenset[str]) -> None:
    """Copy every set field of protobuf message ``source`` into ``target``, except ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        current = getattr(target, descriptor.name)
        if hasattr(current, "extend"):  # repeated field
            current.extend(value)
        elif isinstance(current, Message):
            current.CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when some initializer points at external data."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

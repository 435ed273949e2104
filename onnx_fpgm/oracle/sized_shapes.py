"""Shapes at concrete sizes: the shape inference the analysis reads (``infer_shapes_at``) and
the activation memory a candidate size needs, judged before the model is run at it
(``ActivationBudget``: issue 19, a few-kB model with token attention over H*W took 9 GB at
the second size probed)."""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from ..model.io import light_copy
from ..model.memory import available_bytes
from ..model.outer_scope import proto_with_bodies
from ..model.runtime import make_session, random_inputs
from .symbolic_dims import InputSizes, SymbolicDim

logger = logging.getLogger(__name__)

#: Share of the available memory the activations of one run at a probed size may take: a run
#: holds about two sessions at the chosen sizes (the original and the masked or pruned model)
#: and their outputs, and onnxruntime's peak is about the sum estimated (5.5 GB measured for
#: the 5.4 GB sum of the token-attention model at 96 x 96, batch 2).
PROBE_MEMORY_SHARE = 0.25


def activation_bytes(light: onnx.ModelProto, sizes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of every tensor onnx infers for one run of ``light`` at ``sizes``: the graph
    inputs and every node output (an upper bound of the live ones: onnxruntime reuses buffers;
    tensors of unknown shape count as nothing)."""
    total = 0
    for value in light.graph.input:
        if value.name in sizes:
            total += math.prod(sizes[value.name]) * _itemsize(value.type.tensor_type.elem_type)
    for elem_type, dims in _shapes_at(light, sizes).values():
        if dims is not None and None not in dims:
            total += math.prod(dims) * _itemsize(elem_type)
    return total


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):  # undefined or string elements: not counted
        return 0


class ActivationBudget:
    """Which candidate sizes fit in memory: their estimated activations within
    ``PROBE_MEMORY_SHARE`` of what the process may still take (``model.memory``)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._light: onnx.ModelProto | None = None
        self.available = 0
        self.limit = 0
        self.skipped: list[tuple[dict[str, tuple[int, ...]], int]] = []

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """True when a run at ``shapes`` fits; a size that does not is recorded as skipped."""
        if self._light is None:  # on first use: models without symbolic dims never pay
            self._light = light_copy(self._model)
            del self._light.graph.value_info[:]
            self.available = available_bytes()
            self.limit = int(self.available * PROBE_MEMORY_SHARE)
        need = activation_bytes(self._light, shapes)
        if need <= self.limit:
            return True
        logger.info("size %s skipped: ~%d bytes of activations, budget %d", shapes, need,
                    self.limit)
        self.skipped.append((shapes, need))
        return False

    def _budget(self) -> str:
        return (f"budget {_gib(self.limit)}: a quarter of the {_gib(self.available)} of memory "
                "available")

    def note(self) -> str | None:
        """Which sizes were skipped, for the report (None when none was)."""
        if not self.skipped:
            return None
        shown = [f"{_sizes_text(shapes)} (~{_gib(need)})" for shapes, need in self.skipped[:4]]
        more = f" and {len(self.skipped) - 4} more" if len(self.skipped) > 4 else ""
        return (f"input sizes skipped for their activation memory ({self._budget()}): "
                f"{', '.join(shown)}{more}")

    def refusal(self) -> str:
        """The error when no candidate fits (``--input-shape`` chooses one)."""
        shapes, need = min(self.skipped, key=lambda s: s[1])
        return (f"every size tried for the symbolic dims needs more activation memory than the "
                f"{self._budget()} (the least, {_sizes_text(shapes)}, ~{_gib(need)}); give "
                "--input-shape NAME=D1,D2,... with sizes that fit (input_shapes= in Python)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 10 * 2**30 else f"{n / 2**30:.0f} GiB"


def _sizes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return " ".join(f"{name}={','.join(map(str, shape))}" for name, shape in shapes.items())


def infer_shapes_at(model: onnx.ModelProto, sizes: InputSizes) -> onnx.ModelProto:
    """Shapes of every tensor of ``model`` (light copy, value_info) for the analysis; the
    tensors inside If/Loop/Scan bodies are listed there too (their names are unique model-wide).

    onnx's inference (data propagation on) runs on copies whose inputs are concrete, once per
    size set: with numbers it resolves what it cannot with symbols, in milliseconds, where
    onnxruntime's symbolic engine took seconds (sympy). Tensors it still leaves unknown are read
    off one onnxruntime run of the original at that size. A dim that differs between the two
    sets depends on the input sizes and becomes unknown, so nothing downstream mistakes it for a
    constant (a Shape read of it is not folded, a Reshape computed from it is not rewritten).
    Symbols the secondary set leaves unchanged (the model ran at no other value) are doubled in
    a third, inference-only set, so dims that depend on them stay unknown as well (conservative:
    a dim onnx cannot infer there is treated as unknown).
    """
    light = light_copy(model)
    del light.graph.value_info[:]
    sets = [(sizes.primary, True)]
    if sizes.secondary:
        sets.append((sizes.secondary, True))
    varied = _varied(sizes)
    if varied:
        sets.append((varied, False))
    per_set = [_shapes_at(light, s) for s, _ in sets]
    missing = list(dict.fromkeys(name for (_, run), shapes in zip(sets, per_set) if run
                                 for name in _unknown(light, shapes)))
    if missing:  # one session, one run per set that the original runs at
        ran = _run_for_shapes(model, missing, [s for s, run in sets if run])
        for shapes, found in zip(per_set, ran):
            shapes.update(found)
    symbol_of = _symbols_by_values(model, sizes, [s for s, _ in sets])
    first, *others = per_set
    for name, (elem_type, dims) in first.items():
        value = light.graph.value_info.add()
        value.name = name
        value.type.tensor_type.elem_type = elem_type
        if dims is None:
            continue
        theirs = [o[name][1] if name in o else None for o in others]
        shape = value.type.tensor_type.shape
        shape.SetInParent()
        for k, d in enumerate(dims):
            dim = shape.dim.add()
            values = (d, *(t[k] if t is not None and len(t) == len(dims) else None
                           for t in theirs))
            if d is not None and all(v == d for v in values):
                dim.dim_value = d
            elif values in symbol_of:
                dim.dim_param = symbol_of[values]
    return light


def _symbols_by_values(model: onnx.ModelProto, sizes: InputSizes,
                       size_sets: list[dict[str, tuple[int, ...]]]) -> dict[tuple, str]:
    """Input symbols by the values they take across ``size_sets``, where that is unambiguous.

    A varying dim whose values equal exactly one input symbol's in every set (a batch carried
    through the graph) keeps that symbol, as onnx's symbolic inference would name it, so a
    Reshape target assembled from ``Shape(x)[0]`` is seen to match its input's batch. Other
    varying dims stay unnamed: unknown, and never equal to anything.
    """
    by_values: dict[tuple, set[str]] = {}
    for d in sizes.dims:
        values = tuple(s[d.input][d.axis] for s in size_sets)
        by_values.setdefault(values, set()).add(_dim_symbol(model, d))
    return {v: next(iter(s)) for v, s in by_values.items() if len(s) == 1}


def _dim_symbol(model: onnx.ModelProto, d: SymbolicDim) -> str:
    """The name the analysis reads for the input dim ``d`` (its dim_param, or a token of its
    own for an anonymous dim, as ``deps.shape_values.symbolic_dims`` writes it)."""
    if d.symbol != f"{d.input}:{d.axis}":
        return d.symbol
    return f"?{d.input}#{d.axis}"


def _varied(sizes: InputSizes) -> dict[str, tuple[int, ...]] | None:
    """For inference only: the symbols the secondary set leaves unchanged (all, without one),
    doubled, so that no dim that depends on them passes for a constant. None if not needed."""
    base = sizes.secondary or sizes.primary
    varied = {n: list(s) for n, s in base.items()}
    changed = False
    for d in sizes.dims:
        if base[d.input][d.axis] == sizes.primary[d.input][d.axis]:
            varied[d.input][d.axis] *= 2
            changed = True
    return {n: tuple(s) for n, s in varied.items()} if changed else None


Shapes = dict[str, tuple[int, "list[int | None] | None"]]


def _shapes_at(light: onnx.ModelProto, sizes: dict[str, tuple[int, ...]]) -> Shapes:
    """name -> (elem_type, dims or None) of the tensors onnx infers at ``sizes``."""
    concrete = onnx.ModelProto()
    concrete.CopyFrom(light)
    for value in concrete.graph.input:
        if value.name in sizes:
            for dim, size in zip(value.type.tensor_type.shape.dim, sizes[value.name]):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    for value in concrete.graph.output:  # declared symbolic output dims would be merged in
        value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
    except Exception as err:  # inconsistent at this size: whatever stays unknown is blocked
        logger.debug("onnx shape inference failed at %s: %s", sizes, err)
        inferred = concrete
    shapes: Shapes = {}
    branches = list(proto_with_bodies(inferred.graph))[1:]  # names are unique model-wide
    for value in (*inferred.graph.value_info, *inferred.graph.output,
                  *(v for b in branches for v in b.value_info)):
        ttype = value.type.tensor_type
        dims = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                    for d in ttype.shape.dim]
        shapes[value.name] = (ttype.elem_type, dims)
    return shapes


def _unknown(light: onnx.ModelProto, shapes: Shapes) -> list[str]:
    """Node outputs whose shape (or some dim of it) onnx left unknown."""
    return [o for n in light.graph.node for o in n.output
            if o and (shapes.get(o, (0, None))[1] is None or None in shapes[o][1])]


def _run_for_shapes(model: onnx.ModelProto, names: list[str],
                    size_sets: list[dict[str, tuple[int, ...]]]) -> list[Shapes]:
    """Shapes of ``names`` from onnxruntime runs of ``model``, one per size set, in one session
    (empty where it cannot run)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    wanted = list(names)
    for name in wanted:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        session = make_session(exposed, quiet=True)
    except Exception as err:  # they stay unknown (and block whatever channels reach them)
        logger.debug("onnxruntime cannot load the model for shapes: %s", err)
        return [{} for _ in size_sets]
    found: list[Shapes] = []
    for sizes in size_sets:
        shapes: Shapes = {}
        try:
            values = session.run(wanted, random_inputs(model, 0, sizes))
        except Exception as err:  # as above: unknown
            logger.debug("onnxruntime could not run the model for shapes: %s", err)
            values = []
        for name, value in zip(wanted, values):
            if isinstance(value, np.ndarray):  # a sequence or map has no tensor shape
                shapes[name] = (onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                list(value.shape))
        found.append(shapes)
    return found

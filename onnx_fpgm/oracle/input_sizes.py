"""Concrete sizes for graph inputs with symbolic dims, confirmed by running the original model.

Downloaded models rarely have static inputs: PaddlePaddle writes ``?``, ``-1`` or
``p2o.DynamicDimension.0``, exporters with dynamic axes write ``batch``/``height``/``width``,
tf2onnx ``unk__99``. Verification, MACs and shape inference need numbers, so sizes are chosen
here: one value per symbol (a symbol used twice gets one value), a leading batch of 1, and for
the other dims candidates by the role of the dim (image spatial, channels, sequence length),
small first. A candidate counts only when onnxruntime runs the *original* model at it (a
stride-32 backbone refuses sizes that are not multiples of 32, a fixed-height text recogniser
refuses other heights), so the chosen sizes are ones the model was built for.

Two sets are chosen: the primary (batch 1) for MACs and the first verification, and a secondary
one in which every symbol takes another value where the model allows it (batch 2, another
spatial size): a pruned model whose Reshape or Resize constant was rewritten at one size would
run at that size only, and the second verification catches it. Shape inference reads both sets
too: a dim that differs between them depends on the inputs and is treated as unknown. A KV
cache's past length is 0 in the primary set and non-empty in the secondary (``cache_inputs``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from itertools import zip_longest

import numpy as np
import onnx

from ..errors import ConfigError
from ..model.io import light_copy
from ..model.runtime import (
    ANONYMOUS,
    check_given,
    is_unknown,
    make_session,
    random_inputs,
    real_inputs,
)
from .cache_inputs import past_axes, with_past
from .size_probe import Prober

logger = logging.getLogger(__name__)

#: Spatial (height, width) candidates, small first: multiples of 32 (strided backbones, FPN
#: necks), a text-line shape (fixed height 48 or 32, wide), then classifier sizes.
SPATIAL = ((64, 64), (96, 96), (32, 32), (128, 128), (48, 320), (32, 320), (48, 192),
           (32, 128), (224, 224), (16, 16), (8, 8), (256, 256), (240, 240), (299, 299),
           (320, 320))
#: Sequence lengths (tokens, frames, features of a rank-2/3 input), then audio frames: a raw
#: waveform input behind an STFT (reflect Pad, Conv with a 256-512 tap kernel) needs hundreds of
#: samples (silero VAD runs at 256-576 only).
SEQUENCE = (16, 32, 8, 64, 128, 1, 256, 512, 1024)
#: Channel counts tried for an all-symbolic image input (NCHW, then NHWC).
CHANNELS = (3, 1, 4)
#: Other sizes tried for the secondary set (with batch 2, then with the primary batch).
SECOND_TRIES = 4


class Role(Enum):
    """What a symbolic dim stands for; decides its candidate values."""

    BATCH = "batch"
    HEIGHT = "height"
    WIDTH = "width"
    CHANNELS = "channels"
    SEQUENCE = "sequence"
    PAST = "past sequence"  # a KV cache's past length (``cache_inputs``)


@dataclass(frozen=True)
class SymbolicDim:
    """One symbolic dim of a graph input: where it is, its symbol key and its role."""

    input: str
    axis: int
    symbol: str  # dim_param, or "input:axis" for an anonymous dim
    role: Role


@dataclass
class InputSizes:
    """The sizes used for verification, MACs and shape inference.

    Attributes:
        primary: shape of every real graph input (batch 1): MACs, first verification.
        secondary: another set the original model runs at (other batch/spatial sizes), or None
            when the model has no symbolic dims or accepts no second size.
        given: True when the caller gave ``input_shapes`` (the primary set is theirs).
        dims: the symbolic dims of the inputs.
        probes: onnxruntime runs spent on choosing.
        note: why the sizes are unconfirmed, when the model ran at none (``must_run`` off).
    """

    primary: dict[str, tuple[int, ...]] = field(default_factory=dict)
    secondary: dict[str, tuple[int, ...]] | None = None
    given: bool = False
    dims: list[SymbolicDim] = field(default_factory=list)
    probes: int = 0
    note: str | None = None  # the model ran at none of them (accepted when nothing must run)

    @property
    def sets(self) -> list[dict[str, tuple[int, ...]]]:
        """The size sets to verify at (one or two)."""
        return [self.primary] + ([self.secondary] if self.secondary else [])

    def to_dict(self) -> dict:
        return {"primary": {k: list(v) for k, v in self.primary.items()},
                "secondary": None if self.secondary is None else
                {k: list(v) for k, v in self.secondary.items()},
                "given": self.given,
                "symbolic_dims": [f"{d.input}[{d.axis}]={d.symbol}" for d in self.dims]}


def symbolic_dims(model: onnx.ModelProto) -> list[SymbolicDim]:
    """Every symbolic or unknown dim of the real graph inputs, with its role."""
    found = []
    cache = past_axes(model)
    for value in real_inputs(model):
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = list(ttype.shape.dim)
        roles = [Role.PAST if (value.name, axis) in cache else role
                 for axis, role in enumerate(_roles(dims, ttype.elem_type))]
        for axis, dim in enumerate(dims):
            if is_unknown(dim):
                name = dim.dim_param.strip()
                symbol = name if name not in ANONYMOUS else f"{value.name}:{axis}"
                found.append(SymbolicDim(value.name, axis, symbol, roles[axis]))
    return found


def _roles(dims, elem_type: int) -> list[Role]:
    """Roles by rank and layout: NCHW/NHWC images, [B, T(, F)] sequences, else sequence-like."""
    rank = len(dims)
    roles = [Role.BATCH] + [Role.SEQUENCE] * (rank - 1)
    is_float = onnx.helper.tensor_dtype_to_np_dtype(elem_type).kind == "f" if elem_type else True
    if rank == 4 and is_float:
        def small(d):
            return not is_unknown(d) and d.dim_value <= 4

        nhwc = small(dims[3]) and not small(dims[1])
        roles[1:] = ([Role.HEIGHT, Role.WIDTH, Role.CHANNELS] if nhwc else
                     [Role.CHANNELS, Role.HEIGHT, Role.WIDTH])
    elif rank == 5 and is_float:
        roles[1:] = [Role.CHANNELS, Role.SEQUENCE, Role.HEIGHT, Role.WIDTH]
    return roles


def _candidates(dims: list[SymbolicDim]) -> list[dict[str, int]]:
    """Symbol -> value assignments to try, in order (batch 1)."""
    roles: dict[str, Role] = {}
    for d in dims:
        roles.setdefault(d.symbol, d.role)
    out = []
    channel_options = CHANNELS if Role.CHANNELS in roles.values() else (None,)
    square = _same_symbol_spatial(dims)
    for k in range(max(len(SPATIAL), len(SEQUENCE))):
        for channels in channel_options:
            height, width = SPATIAL[min(k, len(SPATIAL) - 1)]
            sizes = {Role.BATCH: 1, Role.HEIGHT: height, Role.WIDTH: width,
                     Role.CHANNELS: channels, Role.SEQUENCE: SEQUENCE[min(k, len(SEQUENCE) - 1)],
                     Role.PAST: 0}
            assignment = {s: sizes[r] for s, r in roles.items()}
            if square and height != width:
                continue
            if assignment not in out:
                out.append(assignment)
    return out


def _same_symbol_spatial(dims: list[SymbolicDim]) -> bool:
    """True when one symbol is used for both height and width (square inputs only)."""
    return any(d.role is Role.HEIGHT and any(e.symbol == d.symbol and e.role is Role.WIDTH
                                             for e in dims) for d in dims)


def _shapes(model: onnx.ModelProto, dims: list[SymbolicDim],
            assignment: dict[str, int]) -> dict[str, tuple[int, ...]]:
    by_axis = {(d.input, d.axis): assignment[d.symbol] for d in dims}
    shapes = {}
    for value in real_inputs(model):
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        shapes[value.name] = tuple(
            by_axis.get((value.name, axis), d.dim_value if not is_unknown(d) else 1)
            for axis, d in enumerate(ttype.shape.dim))
    return shapes


def choose_sizes(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None = None, *,
                 seed: int = 0, must_run: bool = True) -> InputSizes:
    """Sizes for every real input: ``given`` ones, else chosen by running the model.

    Without ``must_run`` (nothing will be run: ``--dry-run``, ``--no-verify``) a model that
    runs at no candidate gets the first one, with a note, instead of an error.

    Raises:
        ConfigError: the model has symbolic dims and runs at none of the candidate sizes
            (naming the dims and ``--input-shape``), under ``must_run``.
    """
    given = dict(given or {})
    check_given(model, given)
    dims = symbolic_dims(model)
    if not dims:
        return InputSizes(_shapes(model, [], {}) | given, given=bool(given))
    prober = Prober(model, seed)
    fixed = _assignment_of(dims, given)
    candidates = [{**c, **fixed} for c in _candidates(dims)]
    assignment = None
    if all(d.symbol in fixed for d in dims):
        assignment = fixed  # the caller's sizes, whether or not they run (verification says)
    else:
        for candidate in candidates:
            if prober.runs_at(_shapes(model, dims, candidate) | given):
                assignment = candidate
                break
    note = None
    if assignment is None and prober.session is not None:
        if must_run:
            raise ConfigError(_no_size_message(model, dims, prober.error))
        note = "sizes not confirmed: " + _no_size_message(model, dims, prober.error)
    if assignment is None:  # onnxruntime cannot run it at all; verification will say so
        assignment = candidates[0]
    primary = _shapes(model, dims, assignment) | given
    secondary = _secondary(model, dims, assignment, prober, primary) if note is None else None
    sizes = InputSizes(primary, secondary, bool(given), dims, prober.runs, note)
    logger.info("input sizes: %s", sizes.to_dict())
    return sizes


def _assignment_of(dims: list[SymbolicDim], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    return {d.symbol: int(shapes[d.input][d.axis]) for d in dims if d.input in shapes}


def _secondary(model, dims, assignment, prober, primary):
    """A second set the original runs at: batch 2 and other sizes, else batch 2 alone, else
    other sizes alone (a few of each, so that probing stays cheap).

    Other sizes alternate between larger and smaller than the primary's, larger first: a model
    with a minimum input length (an STFT front-end) refuses every smaller one, a fixed-height
    text recogniser may refuse the larger ones. A set with 1 on a non-batch dim comes last: a
    text model checked at sequence length 1 is a degenerate check.
    """
    if prober.session is None:
        return None
    batch = {s for s in assignment if _role(dims, s) is Role.BATCH}
    others = [c for c in _candidates(dims)
              if any(c[s] != assignment[s] for s in c if s not in batch)]
    smaller = [c for c in others if any(c[s] < assignment[s] for s in c if s not in batch)]
    larger = [c for c in others if c not in smaller]
    others = [c for pair in zip_longest(larger, smaller) for c in pair if c is not None]
    lengths = {s for s in assignment if _role(dims, s) not in (Role.BATCH, Role.CHANNELS)}

    def degenerate(trial: dict[str, int]) -> bool:
        return any(trial[s] == 1 for s in lengths)

    others = [c for c in others if not degenerate(c)][:SECOND_TRIES] + \
        [c for c in others if degenerate(c)][:1]
    other_batch = {s: 2 if assignment[s] != 2 else 1 for s in batch}
    options = [{**c, **other_batch} for c in others]
    if batch:
        options.append({**assignment, **other_batch})
    options += [{**c, **{s: assignment[s] for s in batch}} for c in others]
    # a size of 1 (a one-token sequence) checks little: tried last, after every other size
    options = [t for t in options if not degenerate(t)] + [t for t in options if degenerate(t)]
    past = {s for s in assignment if _role(dims, s) is Role.PAST}
    if past:  # a KV cache: the secondary set has a non-empty past
        options = with_past(options, past, {s for s in lengths if s not in past})
    tried = []
    for trial in options:
        if trial in tried or trial == assignment:
            continue
        tried.append(trial)
        shapes = _shapes(model, dims, trial) | {
            n: s for n, s in primary.items() if n not in {d.input for d in dims}}
        if prober.runs_at(shapes):
            return shapes
    return None


def _role(dims: list[SymbolicDim], symbol: str) -> Role:
    return next(d.role for d in dims if d.symbol == symbol)


def _no_size_message(model, dims: list[SymbolicDim], error: str | None) -> str:
    parts = []
    for value in real_inputs(model):
        mine = [d for d in dims if d.input == value.name]
        if not mine:
            continue
        shown = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                 for d in value.type.tensor_type.shape.dim]
        example = ",".join("1" if (i == 0 and is_unknown(d)) else
                           (str(d.dim_value) if not is_unknown(d) else "N")
                           for i, d in enumerate(value.type.tensor_type.shape.dim))
        parts.append(f"input {value.name} [{', '.join(shown)}]: give --input-shape "
                     f"{value.name}={example} with numbers for the N")
    reason = f" (last error: {error})" if error else ""
    return ("onnxruntime runs the model at none of the sizes tried for its symbolic dims; "
            + "; ".join(parts) + " (input_shapes= in Python)" + reason)


# --- shape inference at concrete sizes -----------------------------------------------------


def infer_shapes_at(model: onnx.ModelProto, sizes: InputSizes) -> onnx.ModelProto:
    """Shapes of every tensor of ``model`` (light copy, value_info) for the analysis.

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
    for value in (*inferred.graph.value_info, *inferred.graph.output):
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

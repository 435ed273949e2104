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
too: a dim that differs between them depends on the inputs and is treated as unknown
(``sized_shapes.infer_shapes_at``).

Before a candidate is run, the activation memory it needs is estimated from the shapes onnx
infers at it (``sized_shapes.ActivationBudget``); one over the budget is skipped with a note
(the smaller candidates after it are tried), and when every candidate is over it the run stops
with exit 2 asking for ``--input-shape``: attention over the H*W tokens of an image grows with
(H*W)^2, and a few-kB model reached 9 GB at the second size.

Anonymous dims (``?``) name nothing, so a recurrent state's batch ``(2, ?, 128)`` is not known
to be the waveform's ``(?, samples)`` batch: such a dim is also tried at the batch's value
(``_batch_like``). Integer inputs that pick a branch (``input_ranges`` choices) are drawn at
each value: a size counts only when every branch runs at it. A KV cache's past length is 0
in the primary set and non-empty in the secondary (``cache_inputs``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from itertools import zip_longest

import onnx

from ..errors import ConfigError
from ..model.input_ranges import integer_ranges, variant_count
from ..model.runtime import check_given, is_unknown, make_session, random_inputs, real_inputs
from .cache_inputs import with_past
from .sized_shapes import ActivationBudget
from .symbolic_dims import InputSizes, Role, SymbolicDim, symbolic_dims

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
#: Probing stops after this many onnxruntime runs.
MAX_PROBES = 32
#: Other sizes tried for the secondary set (with batch 2, then with the primary batch).
SECOND_TRIES = 4
def _candidates(dims: list[SymbolicDim]) -> list[dict[str, int]]:
    """Symbol -> value assignments to try, in order (batch 1)."""
    roles: dict[str, Role] = {}
    fixed = {d.symbol: d.value for d in dims if d.role is Role.HEAD_SIZE}
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
            assignment = {s: fixed[s] if s in fixed else sizes[r] for s, r in roles.items()}
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


class _Prober:
    """Runs the original model at candidate sizes in one onnxruntime session."""

    def __init__(self, model: onnx.ModelProto, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.runs = 0
        self.error: str | None = None
        self.budget = ActivationBudget(model)
        #: every branch an integer input picks must run (an If on the sample rate)
        self.variants = variant_count(integer_ranges(model))
        try:
            self.session = make_session(model, quiet=True)
        except Exception as err:  # onnxruntime refuses the model whatever the size
            self.session = None
            self.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)

    @property
    def exhausted(self) -> bool:
        """No further run will be made (no session, or every probe spent)."""
        return self.session is None or self.runs >= MAX_PROBES

    def runs_at(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        import onnxruntime as ort  # on first use: keeps it off the CLI's start-up path

        if self.exhausted:
            return False
        self.runs += 1
        options = ort.RunOptions()
        options.log_severity_level = 4
        try:
            for variant in range(self.variants) if self.variants > 1 else (None,):
                feeds = random_inputs(self.model, self.seed, shapes, variant=variant)
                self.session.run(None, feeds, options)
        except Exception as err:  # this size is refused: try the next
            logger.debug("original model refuses %s: %s", shapes, err)
            self.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            return False
        return True


def choose_sizes(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None = None, *,
                 seed: int = 0, must_run: bool = True) -> InputSizes:
    """Sizes for every real input: ``given`` ones, else chosen by running the model.

    Without ``must_run`` (nothing will be run: ``--dry-run``, ``--no-verify``) a model that
    runs at no candidate gets the first one within the memory budget, with a note, instead of
    an error. Candidates over the budget are skipped (a note in ``InputSizes.budget_note``).

    Raises:
        ConfigError: the model has symbolic dims and runs at none of the candidate sizes
            (naming the dims and ``--input-shape``), under ``must_run``; or every candidate
            is over the memory budget.
    """
    given = dict(given or {})
    check_given(model, given)
    dims = symbolic_dims(model)
    if not dims:
        return InputSizes(_shapes(model, [], {}) | given, given=bool(given))
    prober = _Prober(model, seed)
    fixed = _assignment_of(dims, given)
    tied = _batch_like(dims) - set(fixed)
    candidates = []
    for plain in _candidates(dims):
        for candidate in ({**plain, **fixed}, {**plain, **{s: 1 for s in tied}, **fixed}):
            if candidate not in candidates:
                candidates.append(candidate)
    if all(d.symbol in fixed for d in dims):
        # the caller's sizes, whether or not they run (verification says)
        assignment, fitting = fixed, fixed
    else:
        assignment, fitting = _first_run(model, dims, candidates, given, prober)
    if assignment is not None and tied and all(assignment[s] == 1 for s in tied):
        dims = [replace(d, role=Role.BATCH) if d.symbol in tied else d for d in dims]
    note = None
    if assignment is None and prober.session is not None:
        if must_run:
            raise ConfigError(_no_size_message(model, dims, prober.error))
        note = "sizes not confirmed: " + _no_size_message(model, dims, prober.error)
    if assignment is None:  # onnxruntime cannot run it at all; verification will say so
        assignment = fitting
    primary = _shapes(model, dims, assignment) | given
    secondary = _secondary(model, dims, assignment, prober, primary) if note is None else None
    sizes = InputSizes(primary, secondary, bool(given), dims, prober.runs, note,
                       prober.budget.note())
    logger.info("input sizes: %s", sizes.to_dict())
    return sizes


def _first_run(model, dims, candidates, given, prober) -> tuple[dict | None, dict]:
    """The first candidate within the memory budget that the model runs at (None when none),
    and the first within the budget.

    Raises:
        ConfigError: every candidate is over the memory budget.
    """
    fitting = None
    for candidate in candidates:
        shapes = _shapes(model, dims, candidate) | given
        if not prober.budget.fits(shapes):
            continue
        fitting = fitting or candidate
        if prober.runs_at(shapes):
            return candidate, fitting
        if prober.exhausted:
            break
    if fitting is None:
        raise ConfigError(prober.budget.refusal())
    return None, fitting


def _batch_like(dims: list[SymbolicDim]) -> set[str]:
    """Anonymous dims that may be the batch of another input: the one unknown dim of an input
    whose first dim is fixed, while another input has an unknown batch (a recurrent state,
    ``(layers, ?, hidden)`` next to ``(?, samples)``). Nothing names them alike, so the probe
    also tries them at the batch's value, and they follow the batch when it changes."""
    if not any(d.role is Role.BATCH for d in dims):
        return set()
    per_input: dict[str, list[SymbolicDim]] = {}
    for d in dims:
        per_input.setdefault(d.input, []).append(d)
    return {mine[0].symbol for mine in per_input.values()
            if len(mine) == 1 and mine[0].axis > 0 and mine[0].symbol == f"{mine[0].input}:"
            f"{mine[0].axis}"}


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
    lengths = {s for s in assignment
               if _role(dims, s) not in (Role.BATCH, Role.CHANNELS, Role.HEAD_SIZE)}

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
        if prober.budget.fits(shapes) and prober.runs_at(shapes):
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

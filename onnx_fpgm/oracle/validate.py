"""Verification with onnxruntime: the pruned model must equal the *masked original*.

The masked original is the input model in which every layer that consumes a removed channel
ignores it: Conv/ConvTranspose input-channel slices and Gemm/MatMul weight rows of removed
channels are zeroed. It is built here from the analysis' channel maps alone, independently of the
rewrite, so a rewrite bug shows up as a mismatch. Sessions run on the CPU provider with graph
optimisations disabled, so onnxruntime fusions cannot hide a bug.

Memory: the masked original is the original's graph with a 0/1 ``Mul`` on each such consumer's
input (``mask_consumer_inputs``; the same products as zeroed weight slices), so it shares every
weight with the original; weights are fed to the sessions from NumPy (``weight_feeds``); the
original runs at every size set and its session is freed before the pruned one is built.
``masked_original`` (zeroed weight slices, a full copy) serves consumers a mask cannot reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..deps.channels import Analysis
from ..deps.interface import InterfaceChange
from ..errors import ConfigError, VerificationError
from ..model.input_ranges import integer_ranges, variant_count
from ..model.runtime import is_float, make_session, random_inputs
from . import qdq
from .masking import QOPERATOR_AS, mask_consumer_inputs, masked_original
from .resized_interface import declared_after, kept_expected, pruned_feeds
from .weight_feeds import WeightFedSession, split_weights

#: Oracle tolerance of a float32/float64 output: max |pruned - masked| / max |masked|.
RTOL = 1e-4
#: Absolute floor of the fp32 comparison (outputs whose magnitude is below ATOL / RTOL = 0.01).
ATOL = 1e-6
#: Oracle tolerance of a float16/bfloat16 output. Their 11/8-bit significands round every
#: intermediate result, and the pruned model sums fewer (but the same non-zero) terms in another
#: order, so the two models legitimately differ by a few units in the last place per op; 1e-2
#: relative still catches a wrong or misplaced channel, which changes outputs by O(1).
RTOL_HALF = 1e-2
#: QDQ models: a difference of the real quantized models beyond this many quantization steps is
#: no rounding flip but a wrong model (rounding flips move outputs by a few steps).
MAX_QUANTIZED_STEPS = 64


def tolerance_for(dtype: np.dtype) -> float:
    """The oracle tolerance of an output of ``dtype`` (``RTOL`` or ``RTOL_HALF``)."""
    return RTOL_HALF if np.dtype(dtype).itemsize <= 2 else RTOL


@dataclass
class OutputCompare:
    """Comparison of one graph output."""

    name: str
    max_abs_error: float
    max_rel_error: float
    finite: bool
    shape_ok: bool
    tolerance: float = RTOL

    def __bool__(self) -> bool:
        return self.finite and self.shape_ok and self.max_rel_error <= self.tolerance


@dataclass
class CompareResult:
    """Oracle result over all outputs (truthy when every output matches)."""

    outputs: list[OutputCompare] = field(default_factory=list)
    interface_ok: bool = True
    problem: str | None = None
    reference_failed: bool = False  # onnxruntime could not run the reference model
    checked_at: list[str] = field(default_factory=list)  # input sizes verified, in order
    #: QDQ models: activation Q/DQ pairs were bypassed for the check (see ``qdq``); the real
    #: quantized models' largest output difference, in quantization steps (None: no such output
    #: or not run), and the check's note.
    qdq_bypassed: bool = False
    quantized_steps: float | None = None
    #: QOperator models: integer layers make pruned and masked outputs equal bit for bit.
    bit_exact: bool = False

    def __bool__(self) -> bool:
        return self.interface_ok and self.problem is None and all(self.outputs)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def summary(self) -> str:
        if self.problem:
            return self.problem
        bad = [o for o in self.outputs if not o]
        if not bad:
            text = f"matches the masked original (max relative error {self.max_rel_error:.2e}"
            if self.bit_exact:
                text += ", bit for bit"
            if self.qdq_bypassed:
                text += ", activation quantize/dequantize pairs bypassed"
                if self.quantized_steps is not None:
                    text += (f"; quantized models differ by at most {self.quantized_steps:.3g} "
                             "quantization step(s)")
            return text + ")"
        o = bad[0]
        if not o.shape_ok:
            return f"output {o.name}: its shape differs from the masked original's"
        if not o.finite:
            return (f"output {o.name}: NaN or inf where the masked original has none (or a "
                    f"different one); relative error elsewhere {o.max_rel_error:.2e}")
        return (f"output {o.name}: relative error {o.max_rel_error:.2e} "
                f"(limit {o.tolerance:.0e})")


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto,
            feeds: dict[str, np.ndarray]) -> CompareResult:
    """Run both models on ``feeds`` and compare outputs (interface, finiteness, rel. error)."""
    if _interface(original) != _interface(pruned):
        return CompareResult(interface_ok=False,
                             problem="graph inputs/outputs differ from the original")
    reference = WeightFedSession.of(original)
    try:
        expected = reference.run(feeds)
    except Exception as err:
        return CompareResult(problem="onnxruntime cannot run the reference model: "
                                     f"{_first_line(err)}", reference_failed=True)
    finally:
        reference.close()
    return _compare_pruned(WeightFedSession.of(pruned), [o.name for o in original.graph.output],
                           feeds, expected)


class _SessionPair:
    """Sessions of the reference and the pruned model, created once for several feeds."""

    def __init__(self, reference: onnx.ModelProto, pruned: onnx.ModelProto,
                 optimize: bool = False) -> None:
        self.names = [o.name for o in reference.graph.output]
        self.reference = self.pruned = None
        self.reference_error = self.pruned_error = None
        try:
            self.reference = make_session(reference, optimize=optimize)
        except Exception as err:
            self.reference_error = _first_line(err)
        try:
            self.pruned = make_session(pruned, optimize=optimize)
        except Exception as err:
            self.pruned_error = _first_line(err)

    def compare(self, feeds: dict[str, np.ndarray]) -> CompareResult:
        result = CompareResult()
        try:
            if self.reference is None:
                raise RuntimeError(self.reference_error)
            expected = self.reference.run(None, feeds)
        except Exception as err:
            result.problem = f"onnxruntime cannot run the reference model: {_first_line(err)}"
            result.reference_failed = True
            return result
        try:
            if self.pruned is None:
                raise RuntimeError(self.pruned_error)
            got = self.pruned.run(None, feeds)
        except Exception as err:
            result.problem = f"onnxruntime failed to run the pruned model: {_first_line(err)}"
            return result
        for name, want, have in zip(self.names, expected, got):
            result.outputs.append(_compare_output(name, np.asarray(want), np.asarray(have)))
        return result


def _compare_pruned(session: WeightFedSession, names: list[str], feeds: dict[str, np.ndarray],
                    expected: list) -> CompareResult:
    result = CompareResult()
    try:
        got = session.run(feeds)
    except Exception as err:
        result.problem = f"onnxruntime failed to run the pruned model: {_first_line(err)}"
        return result
    for name, want, have in zip(names, expected, got):
        result.outputs.append(_compare_output(name, np.asarray(want), np.asarray(have)))
    return result


def _compare_output(name: str, want: np.ndarray, have: np.ndarray) -> OutputCompare:
    if want.shape != have.shape:
        return OutputCompare(name, np.inf, np.inf, True, False)
    tolerance = RTOL
    if is_float(want.dtype):
        tolerance = tolerance_for(want.dtype)
        w64, h64 = want.astype(np.float64), have.astype(np.float64)
        # NaN and inf where the masked original has them are matched, not measured: the same
        # non-finite value at the same position passes, anything else fails as non-finite
        nan_w, nan_h = np.isnan(w64), np.isnan(h64)
        inf_w, inf_h = np.isinf(w64), np.isinf(h64)
        finite = bool(np.array_equal(nan_w, nan_h) and np.array_equal(inf_w, inf_h) and
                      np.array_equal(w64[inf_w], h64[inf_h]))
        both = ~(nan_w | nan_h | inf_w | inf_h)
        w64, h64 = w64[both], h64[both]
        diff = np.abs(w64 - h64)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(w64).max()) if w64.size else 0.0
        # allclose-style floor: an output that is zero up to round-off (|values| << 1) is
        # judged by an absolute error of ATOL, not relative to its own noise.
        rel = max_abs / max(scale, ATOL / RTOL)
    else:
        finite = True
        max_abs = float(np.count_nonzero(want != have))
        rel = 0.0 if max_abs == 0 else np.inf
    return OutputCompare(name, max_abs, rel, finite, True, tolerance)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _interface(model: onnx.ModelProto):
    initializers = {t.name for t in model.graph.initializer}
    return ([(v.name, v.type.SerializeToString()) for v in model.graph.input
             if v.name not in initializers],
            [(v.name, v.type.SerializeToString()) for v in model.graph.output])


def verify(original: onnx.ModelProto, pruned: onnx.ModelProto, *, analysis: Analysis | None = None,
           removed_classes: np.ndarray | None = None, opset: int | None = None, seed: int = 0,
           input_shapes: dict[str, tuple[int, ...]] | None = None,
           size_sets: list[dict[str, tuple[int, ...]]] | None = None,
           raise_on_failure: bool = False,
           weights: dict[str, np.ndarray] | None = None,
           extra_feeds: list[dict[str, np.ndarray]] | None = None,
           interface_changes: list[InterfaceChange] | None = None) -> CompareResult:
    """Check the pruned model against the masked original (or against the original itself).

    Without ``analysis``, the pruned model is compared with ``original`` directly, which is the
    right check for a model whose channels were removed by zero-weight slices elsewhere.
    ``size_sets`` (several input-size sets, see ``input_sizes``) verifies at each in turn: a
    pruned model that runs or matches at one size only fails; otherwise ``input_shapes``.
    ``weights`` (name -> array of ``original``'s initializers the caller already holds) are fed
    to the reference as they are, instead of a copy read from the protobuf. ``extra_feeds``
    (calibration samples) are checked after the random inputs (float models).
    ``interface_changes``: KV caches that shrank with their heads (``resized_interface``).

    Raises:
        ConfigError: onnxruntime (CPU) cannot run ``original`` itself (a dtype or opset it has
            no kernel for), so nothing can be verified: the caller should skip verification.
        VerificationError: with ``raise_on_failure``, when the check fails.
    """
    sets = size_sets or [input_shapes]
    changes = interface_changes or []
    masked = analysis is not None and removed_classes is not None and len(removed_classes) > 0
    if masked and (qdq.activation_pairs(original) or
                   any(node.op_type in QOPERATOR_AS for node in original.graph.node)):
        result = _verify_quantized(original, pruned, analysis, removed_classes, opset, seed, sets)
    elif _interface(declared_after(original, changes)) != _interface(pruned):
        result = CompareResult(interface_ok=False,
                               problem="graph inputs/outputs differ from the original")
    else:
        reference = _reference_session(original, analysis, removed_classes, opset, weights) \
            if masked else WeightFedSession(*split_weights(original, weights))
        cases = _cases(sets, extra_feeds, original)
        runs = []  # (feeds, expected outputs) per case, computed before the pruned session
        result = None
        for k, (label, shapes, given, variant) in enumerate(cases):
            try:
                if given is None:
                    feeds, expected = finite_run(reference.run, original, seed + k, shapes,
                                                 variant)
                else:
                    feeds, expected = given, reference.run(given)
                runs.append((feeds, expected))
            except Exception as err:
                result = CompareResult(problem="onnxruntime cannot run the reference model: "
                                               f"{_first_line(err)}", reference_failed=True)
                result.checked_at = [c[0] for c in cases[:k + 1] if c[0]]
                reference.close()
                feeds = given if given is not None else \
                    random_inputs(original, seed + k, shapes, variant=variant)
                _check_runnable(original, masked, feeds, result.problem, weights)
                break
        reference.close()
        if result is None:
            session = WeightFedSession.of(pruned)
            names = [o.name for o in original.graph.output]
            for k, (feeds, expected) in enumerate(runs):
                result = _compare_pruned(session, names, pruned_feeds(feeds, changes),
                                         kept_expected(names, expected, changes))
                result.checked_at = [c[0] for c in cases[:k + 1] if c[0]]
                if not result:
                    if len(cases) > 1:
                        label, _, given, _ = cases[k]
                        where = f"input sizes {label}" if given is None and label else \
                            label or "random inputs"
                        result.problem = f"at {where}: {result.summary()}"
                    break
            session.close()
    if raise_on_failure and not result:
        raise VerificationError(f"verification failed: {result.summary()}")
    return result


#: Redraws of random inputs on which the reference gives NaN or inf, before they count anyway.
REDRAWS = 3


def finite_run(run, original: onnx.ModelProto, seed: int,
               shapes: dict[str, tuple[int, ...]] | None,
               variant: int | None = None) -> tuple[dict[str, np.ndarray], list]:
    """Random feeds and ``run(feeds)``, redrawn (``REDRAWS`` times, one-element float inputs
    positive) while an output is not finite: a model may give NaN on inputs outside its domain
    (a negative frequency bound), which checks nothing. The last draw counts if none is finite;
    the comparison then matches NaN with NaN."""
    for redraw in range(REDRAWS + 1):
        feeds = random_inputs(original, seed + 7919 * redraw, shapes,
                              positive_scalars=redraw > 0, variant=variant)
        expected = run(feeds)
        if all(_finite(np.asarray(v)) for v in expected):
            break
    return feeds, expected


def _finite(value: np.ndarray) -> bool:
    return not is_float(value.dtype) or bool(np.isfinite(value.astype(np.float64)).all())


def _cases(sets: list, extra_feeds: list | None, original: onnx.ModelProto
           ) -> list[tuple[str, dict | None, dict | None, int | None]]:
    """(label, sizes, given feeds, variant) of each verification run: random inputs at each
    size set (once per value an integer input is compared with, and once with none of them:
    each branch of an If on it runs), then the given feeds (calibration samples)."""
    ranges = integer_ranges(original)
    count = variant_count(ranges)
    cases = []
    for s in sets:
        for variant in range(count) if count > 1 else (None,):
            label = (_sizes_text(s) + _variant_text(ranges, variant)).strip()
            cases.append((label, s, None, variant))
    return cases + [(f"calibration samples (batch {len(next(iter(f.values())))})", None, f, None)
                    for f in extra_feeds or ()]


def _variant_text(ranges: dict, variant: int | None) -> str:
    """`` sr=16000`` (or ``sr=other``) for the integer inputs a variant fixes."""
    if variant is None:
        return ""
    parts = [f"{name}={r.choices[variant] if variant < len(r.choices) else 'other'}"
             for name, r in ranges.items() if r.choices]
    return " (" + " ".join(parts) + ")" if parts else ""


def _verify_quantized(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis: Analysis,
                      removed_classes: np.ndarray, opset: int | None, seed: int,
                      sets: list) -> CompareResult:
    """The oracle for quantized graphs: consumer weights of removed channels at their zero
    point. QDQ graphs are compared with activation quantize/dequantize pairs bypassed in both
    models (float), then the real quantized models are run and their largest difference in
    quantization steps reported; QOperator graphs must agree bit for bit (integer layers).
    These graphs are compared with copies of their (int8, small) weights, not the weight-fed
    sessions of float models."""
    reference = masked_original(original, analysis, removed_classes, opset or 13)
    if _interface(reference) != _interface(pruned):
        return CompareResult(interface_ok=False,
                             problem="graph inputs/outputs differ from the original")
    quantized = qdq.activation_pairs(original)
    sessions = _SessionPair(reference, pruned) if not quantized else \
        _SessionPair(qdq.bypass_activation_pairs(reference), qdq.bypass_activation_pairs(pruned))
    for k, shapes in enumerate(sets):
        feeds = random_inputs(original, seed + k, shapes)
        result = sessions.compare(feeds)
        result.checked_at = [_sizes_text(s) for s in sets[:k + 1] if s]
        if result.reference_failed:
            _check_runnable(original, True, feeds, result.problem)
        if not result:
            if len(sets) > 1:
                result.problem = f"at input sizes {_sizes_text(shapes)}: {result.summary()}"
            break
    if result and any(node.op_type in QOPERATOR_AS for node in original.graph.node):
        differing = [o for o in result.outputs if o.max_abs_error > 0]
        result.bit_exact = not differing
        if differing:
            result.problem = (f"output {differing[0].name}: the QOperator model differs from "
                              f"its masked original by {differing[0].max_abs_error:.3g} "
                              "(integer layers must agree bit for bit)")
    if quantized and result:
        result.qdq_bypassed = True
        result.quantized_steps = _quantized_steps(reference, pruned, original, seed, sets)
        if result.quantized_steps is not None and result.quantized_steps > MAX_QUANTIZED_STEPS:
            result.problem = (f"the quantized models differ by {result.quantized_steps:.3g} "
                              f"quantization steps (limit {MAX_QUANTIZED_STEPS})")
    return result


def _quantized_steps(reference: onnx.ModelProto, pruned: onnx.ModelProto,
                     original: onnx.ModelProto, seed: int, sets: list) -> float | None:
    """Largest output difference of the real quantized models, in quantization steps.

    They run as deployed: onnxruntime's optimiser fuses the Q/DQ pairs into integer kernels.
    """
    steps = qdq.output_steps(original)
    if not steps:
        return None
    pair = _SessionPair(reference, pruned, optimize=True)
    if pair.reference is None or pair.pruned is None:
        return None
    names = [o.name for o in original.graph.output]
    worst = None
    for k, shapes in enumerate(sets):
        feeds = random_inputs(original, seed + k, shapes)
        found = qdq.max_steps(names, steps, pair.reference.run(None, feeds),
                              pair.pruned.run(None, feeds))
        if found is not None:
            worst = found if worst is None else max(worst, found)
    return worst


def _sizes_text(shapes: dict[str, tuple[int, ...]] | None) -> str:
    return " ".join(f"{n}={','.join(map(str, s))}" for n, s in (shapes or {}).items() if s)


def smoke_check(original: onnx.ModelProto, model: onnx.ModelProto, *, seed: int = 0,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Same interface, runs, finite outputs where the original's are (for compensated models,
    which are not exact): inputs on which the original gives NaN are redrawn first."""
    if _interface(original) != _interface(model):
        return "graph inputs/outputs differ from the original"
    try:
        session = make_session(original)
        feeds, expected = finite_run(lambda f: session.run(None, f), original, seed,
                                     input_shapes)
    except Exception:  # the original cannot run: judged on random inputs alone
        feeds, expected = random_inputs(original, seed, input_shapes), None
    try:
        outputs = make_session(model).run(None, feeds)
    except Exception as err:
        return f"onnxruntime failed to run it: {str(err).splitlines()[0]}"
    for k, value in enumerate(outputs):
        value = np.asarray(value)
        if value.dtype.kind != "f":
            continue
        allowed = ~np.isfinite(np.asarray(expected[k], np.float64)) if expected is not None \
            and np.shape(expected[k]) == value.shape else False
        if (~np.isfinite(value) & ~allowed).any():
            return "non-finite outputs"
    return None


def _reference_session(original: onnx.ModelProto, analysis: Analysis,
                       removed_classes: np.ndarray, opset: int | None,
                       known: dict[str, np.ndarray] | None) -> WeightFedSession:
    """The masked original's session, sharing the original's weight arrays where it can."""
    light, weights = split_weights(original, known)
    if mask_consumer_inputs(light, analysis, removed_classes):
        return WeightFedSession(light, weights)
    del light, weights
    return WeightFedSession.of(masked_original(original, analysis, removed_classes, opset or 13))


def _check_runnable(original: onnx.ModelProto, masked: bool,
                    feeds: dict[str, np.ndarray], problem: str | None,
                    known: dict[str, np.ndarray] | None = None) -> None:
    """Raise ConfigError when onnxruntime cannot run the input model at all.

    A masked reference that fails while the original runs is a verification failure (left to
    the caller); an original that onnxruntime refuses is a limit of the verifier, not of the
    pruning, and gets its own message.
    """
    if masked:
        session = WeightFedSession(*split_weights(original, known))
        try:
            session.run(feeds)
        except Exception as err:
            problem = _first_line(err)
        else:
            return
        finally:
            session.close()
    else:
        problem = (problem or "").removeprefix("onnxruntime cannot run the reference model: ")
    raise ConfigError(f"cannot verify: onnxruntime (CPU) cannot run the input model ({problem}); "
                      "prune without verification (--no-verify, verify=False) or convert the "
                      "model to a dtype and opset onnxruntime runs")

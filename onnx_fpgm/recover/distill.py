"""Recovery by distillation: the original model teaches the pruned one, on unlabeled data.

The pruned model's trainable weights (``torch_graph.trainable_names``: layer weights and biases,
BatchNormalization scale/bias) are trained in torch so that, on the calibration inputs:

* every graph output matches the original's, part by part as ``measure/fidelity.py`` splits
  it; an output computed by Softmax/LogSoftmax is matched on the Softmax's input (logits), where
  a confident class's error is not squashed away;
* every tensor a layer reads (the input of each Conv, Gemm, MatMul, BatchNormalization)
  matches the original's tensor of the same name: a pruned tensor on its kept channels (the
  analysis' channel map and the plan's removed atoms say which), an unpruned one whole. Dense,
  per-block supervision: every block learns to reproduce its own part of the original, instead
  of one gradient from the end through a damaged network.

Each tensor's loss is its normalised MSE ``|s - t|^2 / |t|^2``; an output part's error is divided
by the teacher's mean square on the held-out data instead (fixed once: a batch with no detection
has near-zero scores and boxes). The loss is the mean over the layer inputs plus the mean over
the output parts. On CPU a step takes ``CPU_BATCH`` samples (fewer when a time budget would
otherwise hold under ``MIN_STEPS`` steps); large fully convolutional image inputs train on random
half-size crops (``augment.py``) and are judged whole. An output split into confidence
parts (values in [0, 1]: scores) and other parts (boxes, coordinates) weights the other parts'
errors at each position by the teacher's highest confidence there: a YOLO head's box at an
anchor that detects nothing is never drawn, and unweighted its error swamps the boxes that are.
Image inputs (rank-4 float) are augmented (horizontal flips, small shifts, brightness/contrast
jitter); other inputs are not. A held-out slice of the calibration data
(``HELD_OUT_FRACTION``) decides early stopping and which weights are kept (the best seen on it,
which may be the untrained ones; the last weights are judged too when the time budget ends
between evaluations). The trained values are written back into the same initializers: same
nodes, names, shapes and dtypes.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ..deps.channels import Analysis
from ..measure.calibration import Calibration
from ..measure.fidelity import part_layout
from .augment import Augmenter
from .recovery_report import RecoveryReport
from .torch_graph import TRAINABLE_INPUTS, TorchGraph, float_feeds, write_back

logger = logging.getLogger(__name__)

#: Share of the calibration samples held out for early stopping (at least one sample).
HELD_OUT_FRACTION = 0.15
#: Samples per training step on CUDA and on CPU (a static batch dim in the model wins).
BATCH = 32
CPU_BATCH = 8
#: On CPU under a time budget, the step after which the batch is shrunk (never grown) so that
#: the time left holds at least ``MIN_STEPS`` steps: on 2 cores one step of 8 YOLOv8n images at
#: 320x320 takes seconds, and a few large steps improve nothing.
TIMED_STEP = 2
MIN_STEPS = 100
#: Held-out evaluations in a time budget (at least; also every 5 % of the step budget).
EVALUATIONS = 10
#: Held-out evaluations without improvement before training stops.
PATIENCE = 8
#: Adam's step size from a damaged start; a start already close to the teacher (a held-out
#: loss L < 1, e.g. after lstsq) takes ``sqrt(L)`` of it (at least a tenth): measured on MNIST
#: at 0.3 MACs, 1e-3 from the lstsq start never improved the held-out loss, 1e-4 did.
LEARNING_RATE = 1e-3
#: Least scale of a confidence-weighted output part, as a share of its unweighted scale (boxes
#: where the held-out set has hardly a confident detection are still not divided by ~0).
SCALE_FLOOR = 1e-3
_EPS = 1e-12


@dataclass
class _Target:
    """One supervised tensor: ``keep`` selects the student's channels in the teacher's."""

    name: str
    axis: int | None = None
    keep: torch.Tensor | None = None
    blocks: tuple = ()  # output parts: (axis, start, stop, confidence) per part; () for whole
    scales: tuple = ()  # the teacher's mean square per part on the held-out data (_fix_scales)


def distill(original: onnx.ModelProto, student_model: onnx.ModelProto, analysis: Analysis,
            removed_atoms: np.ndarray, calibration: Calibration, *, steps: int,
            time_limit: float | None, device: torch.device, seed: int = 0,
            progress: Callable | None = None) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Train ``student_model``'s weights to reproduce ``original``; return the trained copy.

    Raises:
        ConfigError: a graph the differentiable executor cannot run (the op is named).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = TorchGraph(original, device, trainable=False)
    student = TorchGraph(student_model, device)
    report = RecoveryReport("distill", _device_name(device), trained_on=0,
                            parameters=len(student.params))
    train, held = _split(calibration.n_samples, seed)
    report.trained_on, report.held_out = len(train), len(held)
    batch = _batch_size(student_model, device)
    augmenter = Augmenter(original, calibration, seed)
    targets = _targets(teacher, student, original, analysis, removed_atoms, calibration,
                       train[:1], device)

    def runs(feeds: dict[str, torch.Tensor]) -> bool:  # both models, and the loss, at a crop
        with torch.no_grad():
            return bool(torch.isfinite(_loss(student.run(feeds), teacher.run(feeds), targets)))

    augmenter.check_crops(float_feeds(_take(calibration, train[:1]), student, device), runs)
    report.tensors = sum(1 for t in targets if not t.blocks)
    params = student.parameters()
    if not params or not steps:
        report.stopped = "nothing to train" if not params else "no steps"
        return student_model, report
    held_batches = _teacher_batches(teacher, calibration, held, batch, targets, device)
    _fix_scales(targets, held_batches)

    def held_out_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for feeds, want in held_batches:
                n = next(iter(feeds.values())).shape[0]
                total += float(_loss(student.run(feeds), want, targets)) * n
        return total / len(held)

    best_loss = report.loss_before = held_out_loss()
    best = student.trained_values()
    # a batch under BATCH (CPU) takes sqrt(batch / BATCH) of the step size: noisier gradients
    step_size = LEARNING_RATE * min(1.0, max(0.1, math.sqrt(best_loss))) * \
        min(1.0, math.sqrt(batch / BATCH))
    optimiser = torch.optim.Adam(params, lr=step_size)
    evaluate_every = max(10, steps // 20)
    advance = _advancer(progress, steps)
    order = np.random.default_rng(seed)
    pool: list[int] = []
    stale, report.stopped, evaluated, step_seconds = 0, "step budget", 0, 0.0
    training_started = last_evaluation = time.perf_counter()
    for step in range(steps):
        now = time.perf_counter()
        if time_limit is not None and now - started > time_limit:
            report.stopped = "time budget"
            if report.steps > evaluated:  # the steps since the last evaluation count too
                current = held_out_loss()
                if current < best_loss:
                    best_loss, best = current, student.trained_values()
            break
        if step == TIMED_STEP and time_limit is not None and device.type == "cpu":
            batch = _batch_for_budget(batch, step_seconds / batch, time_limit - (now - started))
            logger.debug("distill: %.2f s per step; batch %d from here", step_seconds, batch)
        done = step / steps if time_limit is None else max(
            step / steps, (now - training_started) / max(time_limit - (training_started - started),
                                                          1e-9))
        for group in optimiser.param_groups:  # cosine to 5 % over the step or time budget
            group["lr"] = step_size * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1))))
        if len(pool) < batch:
            pool.extend(order.permutation(train).tolist())
        index, pool = np.array(pool[:batch]), pool[batch:]
        feeds = float_feeds(_take(calibration, index), student, device)
        feeds = augmenter.augment(feeds)
        with torch.no_grad():
            teacher_env = teacher.run(feeds)
        loss = _loss(student.run(feeds), teacher_env, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step_seconds = time.perf_counter() - now
        report.steps = step + 1
        note = None
        due = time_limit is not None and \
            time.perf_counter() - last_evaluation > time_limit / EVALUATIONS
        if report.steps % evaluate_every == 0 or report.steps == steps or due:
            current, evaluated = held_out_loss(), report.steps
            last_evaluation = time.perf_counter()
            note = f"held-out loss {current:.4g}"
            if current < best_loss:
                best_loss, best, stale = current, student.trained_values(), 0
            else:
                stale += 1
            if stale >= PATIENCE:
                report.stopped = "early stop (held-out loss stopped improving)"
                advance(1, note)
                break
        advance(1, note)
    report.loss_after = best_loss
    report.time_s = time.perf_counter() - started
    if best_loss >= report.loss_before:
        report.stopped += "; no step improved the held-out loss: weights left as they were"
        return student_model, report
    return write_back(student_model, best), report


# ---- supervision ----
def _targets(teacher: TorchGraph, student: TorchGraph, original: onnx.ModelProto,
             analysis: Analysis, removed_atoms: np.ndarray, calibration: Calibration,
             probe: np.ndarray, device: torch.device) -> list[_Target]:
    """The supervised tensors, found by running both models once on a few samples."""
    feeds = float_feeds(_take(calibration, probe), student, device)
    with torch.no_grad():
        have, want = student.run(feeds), teacher.run(feeds)
    outputs = [_logits_of(original, name) for name in teacher.outputs]
    targets = []
    for name in (o for o in _layer_inputs(student) if o not in outputs):
        target = _match(name, have.get(name), want.get(name), analysis, removed_atoms, device)
        if target is not None:
            targets.append(target)
    for name in outputs:
        target = _match(name, have.get(name), want.get(name), analysis, removed_atoms, device)
        if target is None:
            continue
        axis, blocks = part_layout(want[name].cpu().numpy(), name)
        target.blocks = tuple((axis, a, b, unit) for _, a, b, unit in blocks) or \
            ((None, 0, 0, False),)
        targets.append(target)
    return targets


def _layer_inputs(graph: TorchGraph) -> list[str]:
    """The computed tensors a layer (Conv, Gemm, MatMul, BatchNormalization) reads as data, in
    graph order: each block's input, the tensor its weights act on. Supervising these rather
    than every tensor (a SiLU's Sigmoid and Mul, a Split's parts) holds each block to the
    original as densely but costs a third of the loss terms, measured on YOLOv8n (277 -> 64)."""
    fixed = {*graph.constants, *graph.params, *graph.inputs}
    names: dict[str, None] = {}
    for step in graph.steps:
        if step.node.op_type in TRAINABLE_INPUTS:
            names.update((n, None) for n in step.node.input if n and n not in fixed)
    return list(names)


def _match(name: str, have, want, analysis: Analysis, removed_atoms: np.ndarray,
           device: torch.device) -> _Target | None:
    if not isinstance(have, torch.Tensor) or not isinstance(want, torch.Tensor):
        return None
    if not have.is_floating_point() or have.dim() < 2 or have.shape[0] != want.shape[0]:
        return None
    if have.shape == want.shape:
        return _Target(name)
    cmap = analysis.maps.get(name)
    if cmap is None or cmap.axis >= want.dim() or want.shape[cmap.axis] != len(cmap.labels):
        return None
    keep = np.flatnonzero(~removed_atoms[cmap.labels])
    expected = list(want.shape)
    expected[cmap.axis] = len(keep)
    if list(have.shape) != expected:
        return None
    return _Target(name, cmap.axis, torch.from_numpy(keep).to(device))


def _logits_of(model: onnx.ModelProto, output: str) -> str:
    """The Softmax/LogSoftmax input behind ``output`` (through Identity), else ``output``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.input[0]
    return output


def _squares(have: torch.Tensor, want: torch.Tensor,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared error, mean square of ``want``), each element weighted by ``weight``."""
    if weight is None:
        return (have - want).square().mean(), want.detach().square().mean()
    return (weight * (have - want).square()).mean(), (weight * want.detach().square()).mean()


def _confidence(teacher: torch.Tensor, blocks: tuple) -> torch.Tensor | None:
    """The teacher's highest confidence per position (the channel axis kept, of size 1), when
    the output has both confidence parts and others; else None (every position counts)."""
    scores = [teacher.narrow(axis, a, b - a) for axis, a, b, unit in blocks if unit]
    if not scores or len(scores) == len(blocks):
        return None
    axis = blocks[0][0]
    return torch.cat(scores, axis).amax(axis, keepdim=True)


def _terms(have: dict, want: dict, target: _Target, weighted: bool = True) -> list[tuple]:
    """(error, the teacher's size) per part of ``target`` (one part for an inner tensor); box
    parts weighted by the teacher's confidence unless ``weighted`` is off."""
    teacher = want[target.name]
    if target.keep is not None:
        teacher = teacher.index_select(target.axis, target.keep)
    student = have[target.name]
    if not target.blocks:
        return [_squares(student, teacher)]
    weight = _confidence(teacher, target.blocks) if weighted else None
    return [_squares(student, teacher) if axis is None else
            _squares(student.narrow(axis, a, b - a), teacher.narrow(axis, a, b - a),
                     None if unit else weight)
            for axis, a, b, unit in target.blocks]


def _loss(have: dict, want: dict, targets: list[_Target]) -> torch.Tensor:
    """Mean normalised error over the inner tensors plus the same over the output parts. Each
    error is divided by the teacher's mean square on the held-out data (``fix_scales``), else
    by its own batch's: on a batch where a YOLO head detects nothing, its scores and confident
    boxes are near zero, and a per-batch ratio of near-zeros makes a step of noise."""
    inner, outer = [], []
    for target in targets:
        terms = _terms(have, want, target)
        scales = target.scales or [size for _, size in terms]
        errors = [error / (scale + _EPS) for (error, _), scale in zip(terms, scales)]
        (outer if target.blocks else inner).extend(errors)
    loss = torch.stack(outer).mean() if outer else torch.zeros(())
    return loss + torch.stack(inner).mean() if inner else loss


def _fix_scales(targets: list[_Target], batches: list[tuple]) -> None:
    """Set each target's per-part scales: the teacher's mean square over ``batches`` (the
    held-out data); a confidence-weighted part's at least ``SCALE_FLOOR`` of its unweighted."""
    totals: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for _, want in batches:
            for target in targets:
                kept = want[target.name] if target.keep is None else \
                    want[target.name].index_select(target.axis, target.keep)
                sizes = [[float(size) for _, size in
                          _terms({target.name: kept}, want, target, weighted)]
                         for weighted in (True, False)]
                totals[target.name] = totals.get(target.name, 0.0) + np.array(sizes)
    for target in targets:
        weighted, plain = totals[target.name] / len(batches)
        target.scales = tuple(np.maximum(weighted, SCALE_FLOOR * plain).tolist())


# ---- data ----
def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sample indices; with fewer than 4 samples both are everything."""
    order = np.random.default_rng(seed).permutation(n)
    if n < 4:
        return order, order
    held = max(1, round(HELD_OUT_FRACTION * n))
    return np.sort(order[held:]), np.sort(order[:held])


def _take(calibration: Calibration, index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: value[index] for name, value in calibration.inputs.items()}


def _batch_size(model: onnx.ModelProto, device: torch.device) -> int:
    """A static batch dim of the model, else ``BATCH`` on CUDA and ``CPU_BATCH`` on CPU."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return dims[0].dim_value
    return BATCH if device.type == "cuda" else CPU_BATCH


def _batch_for_budget(batch: int, seconds_per_sample: float, seconds_left: float) -> int:
    """A smaller batch when ``batch`` would leave fewer than ``MIN_STEPS`` steps in the time
    left (never larger: a static batch dim stays, and memory was sized by the first)."""
    if seconds_per_sample <= 0:
        return batch
    fits = int(seconds_left / (MIN_STEPS * seconds_per_sample))
    return max(1, min(batch, fits))


def _teacher_batches(teacher: TorchGraph, calibration: Calibration, index: np.ndarray,
                     batch: int, targets: list[_Target], device: torch.device) -> list[tuple]:
    """(feeds, the teacher's supervised tensors) per batch of ``index``: the held-out slice is
    judged many times on the same samples, so the teacher runs on it once."""
    names = {t.name for t in targets}
    batches = []
    with torch.no_grad():
        for start in range(0, len(index), batch):
            feeds = float_feeds(_take(calibration, index[start:start + batch]), teacher, device)
            env = teacher.run(feeds)
            batches.append((feeds, {name: env[name] for name in names}))
    return batches


# ---- reporting ----
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _advancer(progress: Callable | None, steps: int) -> Callable:
    """``advance(n, note)`` over the caller's progress callback (a note where it takes one)."""
    if progress is None:
        return lambda n, note=None: None
    advance = progress("distilling", steps)
    try:
        takes_note = "note" in inspect.signature(advance).parameters
    except (TypeError, ValueError):
        takes_note = False
    if takes_note:
        return advance
    return lambda n, note=None: advance(n)

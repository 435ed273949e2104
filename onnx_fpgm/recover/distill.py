"""Recovery by distillation: the original model teaches the pruned one, on unlabeled data.

The pruned model's trainable weights (``torch_graph.trainable_names``: layer weights and biases,
BatchNormalization scale/bias) are trained in torch so that, on the calibration inputs:

* every graph output matches the original's, part by part as ``measure/fidelity.py`` splits
  it; an output computed by Softmax/LogSoftmax is matched on the Softmax's input (logits), where
  a confident class's error is not squashed away;
* every intermediate tensor matches the original's tensor of the same name: a pruned tensor on
  its kept channels (the analysis' channel map and the plan's removed atoms say which), an
  unpruned one whole. Dense, per-block supervision: every block learns to reproduce its own
  part of the original, instead of one gradient from the end through a damaged network.

Each tensor's loss is its normalised MSE ``|s - t|^2 / |t|^2``; the loss is the mean over the
intermediate tensors plus the mean over the output parts. An output split into confidence
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
from .recovery_report import RecoveryReport
from .torch_graph import TorchGraph, float_feeds, write_back

logger = logging.getLogger(__name__)

#: Share of the calibration samples held out for early stopping (at least one sample).
HELD_OUT_FRACTION = 0.15
#: Samples per training step (a static batch dim in the model wins).
BATCH = 32
#: Held-out evaluations without improvement before training stops.
PATIENCE = 8
#: Adam's step size from a damaged start; a start already close to the teacher (a held-out
#: loss L < 1, e.g. after lstsq) takes ``sqrt(L)`` of it (at least a tenth): measured on MNIST
#: at 0.3 MACs, 1e-3 from the lstsq start never improved the held-out loss, 1e-4 did.
LEARNING_RATE = 1e-3
#: Largest shift of an augmented image, as a fraction of its height/width.
MAX_SHIFT = 0.04
#: Share of augmented images flipped left-right: off, since measured on the MNIST model
#: flips (digits are not mirror-symmetric) kept the lstsq start from improving at all.
FLIP = 0.0
#: Largest contrast change (relative) and brightness change (in input standard deviations).
JITTER = 0.05
_EPS = 1e-12


@dataclass
class _Target:
    """One supervised tensor: ``keep`` selects the student's channels in the teacher's."""

    name: str
    axis: int | None = None
    keep: torch.Tensor | None = None
    blocks: tuple = ()  # output parts: (axis, start, stop, confidence) per part; () for whole


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
    batch = _batch_size(student_model)
    images = _image_inputs(original, calibration)
    targets = _targets(teacher, student, original, analysis, removed_atoms, calibration,
                       train[:batch], device)
    report.tensors = sum(1 for t in targets if not t.blocks)
    params = student.parameters()
    if not params or not steps:
        report.stopped = "nothing to train" if not params else "no steps"
        return student_model, report

    def held_out_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(held), batch):
                index = held[start:start + batch]
                feeds = float_feeds(_take(calibration, index), student, device)
                loss = _loss(student.run(feeds), teacher.run(feeds), targets)
                total += float(loss) * len(index)
        return total / len(held)

    best_loss = report.loss_before = held_out_loss()
    best = student.trained_values()
    step_size = LEARNING_RATE * min(1.0, max(0.1, math.sqrt(best_loss)))
    optimiser = torch.optim.Adam(params, lr=step_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1))))
    evaluate_every = max(10, steps // 20)
    advance = _advancer(progress, steps)
    generator = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed)
    pool: list[int] = []
    stale, report.stopped, evaluated = 0, "step budget", 0
    for step in range(steps):
        if time_limit is not None and time.perf_counter() - started > time_limit:
            report.stopped = "time budget"
            if report.steps > evaluated:  # the steps since the last evaluation count too
                current = held_out_loss()
                if current < best_loss:
                    best_loss, best = current, student.trained_values()
            break
        if len(pool) < batch:
            pool.extend(order.permutation(train).tolist())
        index, pool = np.array(pool[:batch]), pool[batch:]
        feeds = float_feeds(_take(calibration, index), student, device)
        feeds = _augment(feeds, images, generator)
        with torch.no_grad():
            teacher_env = teacher.run(feeds)
        loss = _loss(student.run(feeds), teacher_env, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        report.steps = step + 1
        note = None
        if report.steps % evaluate_every == 0 or report.steps == steps:
            current, evaluated = held_out_loss(), report.steps
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
    computed = [o for step in student.steps for o in step.node.output if o]
    targets = []
    for name in (o for o in computed if o not in outputs):
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


def _nmse(have: torch.Tensor, want: torch.Tensor,
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """``|have - want|^2 / |want|^2``, each element weighted by ``weight`` (broadcast)."""
    if weight is None:
        return (have - want).square().mean() / (want.square().mean() + _EPS)
    return (weight * (have - want).square()).sum() / ((weight * want.square()).sum() + _EPS)


def _confidence(teacher: torch.Tensor, blocks: tuple) -> torch.Tensor | None:
    """The teacher's highest confidence per position (the channel axis kept, of size 1), when
    the output has both confidence parts and others; else None (every position counts)."""
    scores = [teacher.narrow(axis, a, b - a) for axis, a, b, unit in blocks if unit]
    if not scores or len(scores) == len(blocks):
        return None
    axis = blocks[0][0]
    return torch.cat(scores, axis).amax(axis, keepdim=True)


def _loss(have: dict, want: dict, targets: list[_Target]) -> torch.Tensor:
    inner, outer = [], []
    for target in targets:
        teacher = want[target.name]
        if target.keep is not None:
            teacher = teacher.index_select(target.axis, target.keep)
        student = have[target.name]
        if not target.blocks:
            inner.append(_nmse(student, teacher))
            continue
        weight = _confidence(teacher, target.blocks)
        for axis, a, b, unit in target.blocks:
            if axis is None:
                outer.append(_nmse(student, teacher))
            else:
                outer.append(_nmse(student.narrow(axis, a, b - a), teacher.narrow(axis, a, b - a),
                                   None if unit else weight))
    loss = torch.stack(outer).mean() if outer else torch.zeros(())
    return loss + torch.stack(inner).mean() if inner else loss


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


def _batch_size(model: onnx.ModelProto) -> int:
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return dims[0].dim_value
    return BATCH


def _image_inputs(model: onnx.ModelProto, calibration: Calibration) -> dict[str, tuple]:
    """Rank-4 float inputs: name -> (height axis, width axis, mean, std) for augmentation."""
    images = {}
    for name, value in calibration.inputs.items():
        if value.ndim != 4 or value.dtype.kind != "f":
            continue
        channels_last = value.shape[3] in (1, 3, 4) and value.shape[1] not in (1, 3, 4)
        axes = (1, 2) if channels_last else (2, 3)
        images[name] = (*axes, float(value.mean()), float(value.std()) or 1.0)
    return images


def _augment(feeds: dict[str, torch.Tensor], images: dict[str, tuple],
             generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Flip, shift and jitter each image of the batch (other inputs pass as they are)."""
    result = dict(feeds)
    for name, (h_axis, w_axis, mean, std) in images.items():
        x = feeds[name]
        n = x.shape[0]
        flip = torch.rand(n, generator=generator) < FLIP
        x = torch.where(flip.to(x.device).reshape(-1, 1, 1, 1), x.flip(w_axis), x)
        dy, dx = (int(torch.randint(-m, m + 1, (), generator=generator)) if m else 0
                  for m in (int(MAX_SHIFT * x.shape[h_axis]), int(MAX_SHIFT * x.shape[w_axis])))
        x = _shift(x, h_axis, dy)
        x = _shift(x, w_axis, dx)
        contrast = 1 + 2 * JITTER * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
        brightness = JITTER * std * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
        result[name] = mean + (x - mean) * contrast.to(x.device) + brightness.to(x.device)
    return result


def _shift(x: torch.Tensor, axis: int, by: int) -> torch.Tensor:
    """Move the image ``by`` pixels along ``axis``, repeating the edge into the gap."""
    if not by:
        return x
    size = x.shape[axis]
    edge = x.narrow(axis, 0, 1) if by > 0 else x.narrow(axis, size - 1, 1)
    fill = edge.expand(*[abs(by) if a == axis else -1 for a in range(x.dim())])
    body = x.narrow(axis, 0, size - by) if by > 0 else x.narrow(axis, -by, size + by)
    return torch.cat([fill, body] if by > 0 else [body, fill], dim=axis)


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

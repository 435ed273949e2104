"""Sequential layer-wise reconstruction (``--compensate sequential``), in one pass.

The original and the pruned model run side by side in the torch executor (``torch_graph``) over
the calibration samples, node by node in their stored (topological) order; every activation is
dropped after its last reader, so a few are held at a time. When the pruned walk reaches a layer
to refit, its *actual* input ``X_p`` (from the layers before it, already refitted) and the
original layer's output ``Y_o = X_o W + b`` on the original's own input are both at hand. The
layer's kept weights and bias are refitted by damped least squares,

    min ||A_p W' - Y_o||^2 + lam ||W' - W_0||^2,   lam = DAMPING * mean diag(A_p^T A_p),

``A_p``: design rows of ``X_p`` (``layers.design_rows``, a ones column for the bias), ``W_0``: the
weights the layer has (the kept slices). The walk then continues with the refitted layer's
output. On a consumer whose input did not drift (``X_p = X_o``) this is the OBS update on the
original inputs (``obs.py``: the same damped Hessian); deeper it also absorbs the error of the
layers before, as ``lstsq`` does, but with one pass instead of one model run per layer. Why the
torch executor and not onnxruntime: it stops at every node, and the original's target is
computed when it is needed, so no layer's outputs are stored for later.

Refitted: the consumers of removed channels, and (``REFIT_DOWNSTREAM``) every other
Conv/Gemm/MatMul whose input drifted because of them. A layer whose form the fit cannot take
(grouped Conv, a computed weight, ...) is left to the caller (``compensate`` folds the bias there).

A detector's class-score layers fit weighted least squares: each row weighted by the teacher's
confidence at its position (``confidence.py``; a class logit's error matters where something is
detected). A model without class scores fits as before, bit for bit.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..measure.calibration import Calibration, static_batch
from .confidence import PROBE_SAMPLES, ConfidenceMaps, confidence_maps
from .layers import (
    Consumer,
    attr,
    constant,
    design_rows,
    first_samples,
    node_named,
    output_rows,
    write_weight_rows,
)
from .obs import design_of
from .torch_graph import TorchGraph, check_supported, float_feeds

logger = logging.getLogger(__name__)

#: Most calibration samples walked; all are held at each layer, so fewer when the inputs are
#: large: at most ``INPUT_BYTES`` of float32 inputs (the activations scale with them).
MAX_SAMPLES = 512
INPUT_BYTES = 128 << 20
#: Design rows per refitted layer, spread over the samples.
MAX_ROWS = 16384
#: Damping of ``A_p^T A_p`` towards the layer's current weights, relative to its mean diagonal.
DAMPING = 1e-2
#: Design values unfolded at once (bounds the im2col memory of a wide Conv).
UNFOLD_VALUES = 1 << 24
#: Refit the layers downstream of a pruned one whose inputs only drifted (not pruned): they
#: absorb the drift as the consumers do (YOLOv8n's 1.5x sensitivity plan: 20 -> 37 layers,
#: detection F1 0.63 -> 0.68; benchmarks/RESULTS.md).
REFIT_DOWNSTREAM = True
#: Weight the rows of a detector's class-score layers by the teacher's confidence
#: (``confidence.py``); off: every row counts the same. (On YOLOv8n's calibration photos the
#: teacher is confident almost nowhere: the same F1 either way.)
CONFIDENCE_WEIGHTS = True


@dataclass
class Refit:
    """A layer the walk refits: its node, and which of the original's output channels it keeps
    (None: all)."""

    node: str
    kept_out: np.ndarray | None


def unavailable(original: onnx.ModelProto, pruned: onnx.ModelProto) -> str | None:
    """Why the walk cannot run these graphs (an op the torch executor lacks), else None."""
    return check_supported(original) or check_supported(pruned)


def fit_reason(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    """Why the fit cannot refit ``node`` ("" when it can)."""
    if node.op_type == "Conv" and attr(node, "group", 1) != 1:
        return "a grouped Conv"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "a Gemm with transA"
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"a {node.op_type}"
    return design_of(model, node)[0]


def split_fittable(model: onnx.ModelProto, consumers: list[Consumer]
                   ) -> tuple[list[Refit], list[Consumer], list[str]]:
    """(the consumers the walk refits, those it cannot, a note for each of the latter)."""
    fits, left, notes = [], [], []
    for consumer in consumers:
        reason = fit_reason(model, node_named(model, consumer.node))
        if reason:
            left.append(consumer)
            notes.append(f"{consumer.node}: sequential fit not applicable ({reason}); "
                         f"bias compensation instead")
        else:
            fits.append(Refit(consumer.node, consumer.kept_out))
    return fits, left, notes


def downstream_refits(original: onnx.ModelProto, model: onnx.ModelProto,
                      consumers: list[Consumer], fits: list[Refit]) -> list[Refit]:
    """Layers after the consumers whose input drifted (not pruned): each keeps the original's
    output channels whose rows it holds bit-exact (kept weights are never changed)."""
    drifted = set()
    chosen = {f.node for f in fits}
    touched = {c.node for c in consumers}
    extra = []
    for node in model.graph.node:
        if node.name in touched or any(n in drifted for n in node.input):
            drifted.update(node.output)
        else:
            continue
        if node.name in chosen or fit_reason(model, node) or \
                not any(n.name == node.name for n in original.graph.node):
            continue
        onode = node_named(original, node.name)
        if fit_reason(original, onode):
            continue
        kept = _kept_rows(design_of(original, onode)[1], design_of(model, node)[1])
        if kept is not None:
            extra.append(Refit(node.name, kept))
    return extra


def _kept_rows(original_rows: np.ndarray, pruned_rows: np.ndarray) -> np.ndarray | None:
    """Index in ``original_rows`` of each of ``pruned_rows`` (weights and bias, bit-exact)."""
    if original_rows.shape[1] != pruned_rows.shape[1]:
        return None
    lookup: dict[bytes, int] = {}
    for index, row in enumerate(original_rows):
        lookup.setdefault(row.tobytes(), index)
    found = [lookup.get(row.tobytes()) for row in pruned_rows]
    return None if any(i is None for i in found) else np.array(found, dtype=np.int64)


class _Walk:
    """One graph executed step by step over chunks of samples, each tensor freed after its
    last reader."""

    def __init__(self, graph: TorchGraph, chunks: list[dict]) -> None:
        self.graph = graph
        self.envs = [{**graph.constants, **graph.params, **feeds} for feeds in chunks]
        self.position = 0
        last: dict[str, int] = {}
        for index, step in enumerate(graph.steps):
            for name in step.node.input:
                last[name] = index
        kept = set(graph.constants) | set(graph.params)
        self._free_after: dict[int, list[str]] = {}
        for name, index in last.items():
            if name not in kept:
                self._free_after.setdefault(index, []).append(name)

    def step(self, weights: list | None = None) -> onnx.NodeProto:
        """Run the next step on every chunk (``weights``: its inputs after the first instead)."""
        step = self.graph.steps[self.position]
        for env in self.envs:
            inputs = None if weights is None else [env[step.node.input[0]], *weights]
            self.graph.run_step(step, env, inputs)
        self.free(self.position)
        self.position += 1
        return step.node

    def free(self, index: int) -> None:
        for env in self.envs:
            for name in self._free_after.get(index, ()):
                env.pop(name, None)

    def run_until(self, name: str) -> onnx.NodeProto | None:
        """Advance until the node called ``name`` ran (None: it is not ahead)."""
        while self.position < len(self.graph.steps):
            if self.step().name == name:
                return self.graph.steps[self.position - 1].node
        return None


def refit_sequentially(original: onnx.ModelProto, model: onnx.ModelProto, fits: list[Refit],
                       calibration: Calibration) -> list[str]:
    """Refit ``fits`` in ``model`` (in place) layer after layer; notes on what was done."""
    import torch  # the executor; torch stays off the start-up path

    started = time.perf_counter()
    per_sample = sum(v[0].size * 4 for v in calibration.inputs.values()) or 1
    data = first_samples(calibration, max(1, min(MAX_SAMPLES, INPUT_BYTES // per_sample)))
    fixed = static_batch(original, data)
    batch = fixed or data.n_samples
    usable = data.n_samples // batch * batch
    if usable == 0:
        return [(f"sequential: fewer calibration samples than the model's fixed batch {batch}; "
                 f"not refitted")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = TorchGraph(original, device, trainable=False)
    student = TorchGraph(model, device, trainable=False)
    arrays = [{k: v[s:s + batch] for k, v in data.inputs.items()} for s in range(0, usable, batch)]
    todo = {f.node: f for f in fits}
    weights, weight_note = None, ""
    if CONFIDENCE_WEIGHTS:
        probe = arrays[:max(1, PROBE_SAMPLES // batch)] if fixed else \
            [{k: v[:PROBE_SAMPLES] for k, v in arrays[0].items()}]
        weights, weight_note = confidence_maps(
            original, teacher, [float_feeds(a, teacher, device) for a in probe],
            first_samples(data, usable), set(todo))
    teacher_walk = _Walk(teacher, [float_feeds(a, teacher, device) for a in arrays])
    student_walk = _Walk(student, [float_feeds(a, student, device) for a in arrays])
    rng = np.random.default_rng(0)
    done, missed = 0, []
    with torch.no_grad():
        while student_walk.position < len(student.steps):
            node = student.steps[student_walk.position].node
            refit = todo.get(node.name)
            onode = teacher_walk.run_until(node.name) if refit is not None else None
            if onode is None:
                if refit is not None:
                    missed.append(node.name)
                student_walk.step()
                continue
            inputs = _refit_layer(model, node, refit, student_walk.envs, teacher_walk.envs,
                                  onode.output[0], rng, device, weights, batch)
            student_walk.step(inputs)
            done += 1
    notes = [(f"sequential: refitted {done} layer(s) on {usable} calibration samples in "
              f"{time.perf_counter() - started:.1f} s")]
    if weight_note:
        notes.append(weight_note)
    if missed:
        notes.append(f"sequential: {len(missed)} layer(s) not found in the original's order, "
                     f"left as they are: {', '.join(missed[:4])}")
    return notes


def _refit_layer(model, node, refit: Refit, student_envs, teacher_envs, target: str, rng,
                 device, weights: ConfidenceMaps | None, batch: int) -> list:
    """Fit ``node``'s weights (and bias) on its walked inputs against the original's output
    ``target`` (rows weighted by ``weights`` when it holds ``node``: chunks of ``batch``
    samples); write them into ``model`` and return them as the step's new inputs."""
    import torch  # the executor's tensors

    _, prior, channel = design_of(model, node)
    with_bias = channel[-1] < 0
    width = prior.shape[1]
    gram = np.zeros((width, width))
    cross = np.zeros((width, prior.shape[0]))
    quota = math.ceil(MAX_ROWS / len(student_envs))
    weight = _stored(model, node.input[1])
    for index, (student_env, teacher_env) in enumerate(zip(student_envs, teacher_envs)):
        x = student_env[node.input[0]].float().cpu().numpy()
        y = teacher_env[target].float().cpu().numpy()
        if refit.kept_out is not None:
            y = np.take(y, refit.kept_out, axis=1 if node.op_type != "MatMul" else -1)
        row_weights = None if weights is None else \
            weights.row_weights(node.name, index * batch, index * batch + len(x))
        for a, t, w in _rows(node, weight, x, y, quota, rng, row_weights):
            if with_bias:
                a = np.concatenate([a, np.ones((len(a), 1), a.dtype)], 1)
            weighted = a if w is None else a * w[:, None]
            gram += (weighted.T @ a).astype(np.float64)
            cross += (weighted.T @ t).astype(np.float64)
    damping = DAMPING * np.trace(gram) / width + 1e-12
    solution = np.linalg.solve(gram + damping * np.eye(width), cross + damping * prior.T)
    rows = solution.T
    bias = rows[:, -1] if with_bias else None
    write_weight_rows(model, node, weight, rows[:, :-1] if with_bias else rows, bias)
    new_weight = _stored(model, node.input[1])
    new_bias = _stored(model, node.input[2]) if with_bias else None
    tensors = [new_weight] if new_bias is None else [new_weight, new_bias]
    return [torch.from_numpy(v.astype(np.float32)).to(device) for v in tensors]


def _rows(node, weight, x: np.ndarray, y: np.ndarray, quota: int, rng,
          row_weights: np.ndarray | None = None):
    """(design rows, target rows, their weights or None) of up to ``quota`` rows drawn from
    this chunk (``row_weights``: one per design row of the whole chunk)."""
    per_sample = max(1, int(np.prod(y.shape[2:]))) if node.op_type == "Conv" else \
        max(1, int(np.prod(y.shape[1:-1]))) if node.op_type == "MatMul" else 1
    width = int(np.prod(weight.shape[1:])) if node.op_type == "Conv" else x.shape[-1]
    step = max(1, UNFOLD_VALUES // max(per_sample * width, 1))
    share = math.ceil(quota / math.ceil(len(x) / step))
    for start in range(0, len(x), step):
        a = design_rows(node, weight, x[start:start + step])
        t = output_rows(node, y[start:start + step])
        if len(a) != len(t):
            raise ValueError(f"{node.name}: {len(a)} design rows for {len(t)} outputs")
        w = None
        if row_weights is not None:
            rows_per_sample = len(row_weights) // len(x)
            w = row_weights[start * rows_per_sample:(start + step) * rows_per_sample]
            if len(w) != len(a):
                raise ValueError(f"{node.name}: {len(w)} row weights for {len(a)} design rows")
        if len(a) > share:
            pick = np.sort(rng.choice(len(a), share, replace=False))
            a, t = a[pick], t[pick]
            w = None if w is None else w[pick]
        yield a.astype(np.float32), t.astype(np.float32), w


def _stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    value = constant(model, name)
    if value is None:
        raise ValueError(f"{name} is not stored")
    return value

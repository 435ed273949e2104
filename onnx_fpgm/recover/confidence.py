"""Confidence weights for the layer-wise refit of a detector's class-score layers.

A detector's class scores sit behind a sigmoid: at a background position (logit -8) an error in
the logit moves nothing, at a confident one a small error moves a score across the detection
threshold. An unweighted fit spends its freedom on the many background positions, so
``sequential`` weights each design row of a class-score layer by the teacher's confidence at
its position, ``max(sigmoid(highest class logit), FLOOR)`` (the floor: background still counts).

Found from the graph and the teacher's values, not from node names:

1. score blocks: an output that ``fidelity.part_layout`` splits into a block of values in
   [0, 1] (scores) and another block (boxes), on the teacher's outputs for a few samples;
2. class layers: the Convs whose output a score block depends on and no other block does
   (autograd on those samples: a tensor a block does not read gets no gradient or exact zeros);
3. logit layers: the class layers no other class layer reads downstream, with one output
   channel per score; together the sigmoid of their highest logit per position must be the
   score block's highest score per anchor (checked on those samples: else no weights at all);
4. each class layer takes the confidence map of a logit layer downstream of it on the same
   spatial grid (one position of its output feeds that anchor's scores).

A model without such a block (a classifier, a segmenter) gets no weights: the fit is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..measure.calibration import Calibration, static_batch
from ..measure.fidelity import part_layout
from .layers import run_exposed
from .torch_graph import TorchGraph, check_supported, float_feeds

#: Least weight of a row: background positions still count this much against a confident one.
FLOOR = 0.2
#: Samples the class layers are found on (autograd through the whole teacher: one is enough
#: for the structure, and on YOLOv8n at 320x320 it costs a forward and two backward passes).
PROBE_SAMPLES = 1
#: How close the logit layers' sigmoid must come to the score block (float32 paths differ).
MATCH_TOLERANCE = 1e-4


@dataclass
class ConfidenceMaps:
    """The teacher's confidence per walked sample and position, for each class layer."""

    maps: dict[str, np.ndarray]  # logit layer's output -> (samples, H*W), floored
    layers: dict[str, str]  # class layer node -> its logit layer's output

    def row_weights(self, node: str, start: int, stop: int) -> np.ndarray | None:
        """Weights of the design rows of samples ``start:stop`` of ``node`` (sample-major, then
        position, as ``layers.design_rows`` lays out a Conv), None for a layer not weighted."""
        name = self.layers.get(node)
        return None if name is None else self.maps[name][start:stop].reshape(-1)


def confidence_maps(original: onnx.ModelProto, teacher, probe: list[dict],
                    data: Calibration, nodes: set[str]) -> tuple[ConfidenceMaps | None, str]:
    """Confidence weights for those of ``nodes`` that are class layers of ``original`` (steps
    1-4 of the module docstring), and a note ("" when the model has no score block).

    Args:
        original: the unpruned model (the teacher).
        teacher: its ``TorchGraph``.
        probe: a few samples' feeds for ``teacher`` (torch tensors), the class layers' search.
        data: the samples the walk refits on; the maps cover them in order.
        nodes: the layers the walk refits.
    """
    layers, reason = _class_layers(original, teacher, probe)
    if not layers:
        return None, reason
    wanted = {node: logit for node, logit in layers.items() if node in nodes}
    if not wanted:
        return None, ""
    names = sorted(set(wanted.values()))
    values = run_exposed(original, names, data)
    maps = {name: np.maximum(_sigmoid(v.max(axis=1)), FLOOR).reshape(len(v), -1)
            .astype(np.float32) for name, v in zip(names, values)}
    mean = float(np.mean(np.concatenate([m.reshape(-1) for m in maps.values()])))
    return ConfidenceMaps(maps, wanted), (f"sequential: {len(wanted)} class-score layer(s) "
                                          f"weighted by the teacher's confidence (floor {FLOOR}, "
                                          f"mean weight {mean:.2f})")


def teacher_confidence(original: onnx.ModelProto, data: Calibration, nodes: set[str]
                       ) -> tuple[ConfidenceMaps | None, str]:
    """``confidence_maps`` with a teacher of its own on CPU, probed on the first samples (for
    ``obs``, which has no torch graph at hand); None for a graph the executor cannot run."""
    import torch  # the probe's device

    if check_supported(original):
        return None, ""
    teacher = TorchGraph(original, "cpu", trainable=False)
    count = static_batch(original, data) or PROBE_SAMPLES
    probe = float_feeds({k: v[:count] for k, v in data.inputs.items()}, teacher,
                        torch.device("cpu"))
    return confidence_maps(original, teacher, [probe], data, nodes)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _class_layers(original: onnx.ModelProto, teacher, probe: list[dict]
                  ) -> tuple[dict[str, str], str]:
    """{class layer node: its logit layer's output tensor}, or ({}, why not)."""
    import torch  # the teacher's autograd

    convs = [s.node for s in teacher.steps if s.node.op_type == "Conv"]
    if not convs:  # no layer the weights apply to: skip the probe
        return {}, ""
    runs = []
    with torch.enable_grad():
        for feeds in probe:
            feeds = {k: v.clone().requires_grad_(v.is_floating_point())
                     for k, v in feeds.items()}
            runs.append(teacher.run(feeds))
    score_only: dict[str, bool] = {n.name: True for n in convs}
    reached = dict.fromkeys(score_only, False)
    found_block = False
    for output in teacher.outputs:
        want = torch.cat([env[output].detach() for env in runs]).cpu().numpy()
        axis, blocks = part_layout(want, output)
        if axis is None or all(unit for *_, unit in blocks) or \
                not any(unit for *_, unit in blocks):
            continue
        found_block = True
        for env in runs:
            value = env[output]
            mask = torch.zeros_like(value)
            for _, a, b, unit in blocks:
                mask.narrow(axis, a, b - a).fill_(1.0 if unit else -1.0)
            cotangent = torch.rand(value.shape, generator=torch.Generator().manual_seed(0))
            cotangent = cotangent.to(value.device) + 0.5
            tensors = [env[n.output[0]] for n in convs]
            scores = torch.autograd.grad(value, tensors, cotangent * (mask > 0),
                                         retain_graph=True, allow_unused=True)
            others = torch.autograd.grad(value, tensors, cotangent * (mask < 0),
                                         retain_graph=True, allow_unused=True)
            for node, s, o in zip(convs, scores, others):
                if s is not None and bool(s.abs().sum() > 0):
                    reached[node.name] = True
                if o is not None and bool(o.abs().sum() > 0):
                    score_only[node.name] = False
    if not found_block:
        return {}, ""
    classes = [n for n in convs if reached[n.name] and score_only[n.name]]
    if not classes:
        return {}, "sequential: no layer feeds only the class scores; rows not weighted"
    shapes = {n.output[0]: tuple(runs[0][n.output[0]].shape) for n in classes}
    downstream = _downstream(original, classes)
    logits = [n for n in classes
              if not any(m.name in downstream[n.name] for m in classes if m is not n)]
    reason = _check_logits(teacher, runs, logits)
    if reason:
        return {}, f"sequential: class-score layers found but {reason}; rows not weighted"
    layers = {}
    for node in classes:
        grid = shapes[node.output[0]][2:]
        match = next((m for m in logits if m is node or (
            m.name in downstream[node.name] and shapes[m.output[0]][2:] == grid)), None)
        if match is not None:
            layers[node.name] = match.output[0]
    return layers, ""


def _downstream(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, set[str]]:
    """Names of the nodes that read (directly or not) each of ``nodes``' outputs."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    result = {}
    for start in nodes:
        seen: set[str] = set()
        todo = list(start.output)
        while todo:
            for reader in readers.get(todo.pop(), ()):
                if reader.name not in seen:
                    seen.add(reader.name)
                    todo.extend(reader.output)
        result[start.name] = seen
    return result


def _check_logits(teacher, runs: list[dict], logits: list[onnx.NodeProto]) -> str:
    """Why the logit layers' sigmoid is not the score block's per-anchor maximum ("" if it is)."""
    import torch  # the probe's tensors

    for output in teacher.outputs:
        want = torch.cat([env[output].detach() for env in runs]).cpu().numpy()
        axis, blocks = part_layout(want, output)
        units = [(a, b) for (_, a, b, unit) in blocks if unit] if axis is not None else []
        if not units or len(units) == len(blocks):
            continue
        scores = np.concatenate([np.take(want, range(a, b), axis=axis) for a, b in units], axis)
        width = scores.shape[axis]
        best = np.sort(np.moveaxis(scores, axis, 1).max(axis=1).reshape(len(want), -1), axis=1)
        if any(tuple(runs[0][n.output[0]].shape)[1] != width for n in logits):
            return f"not every last one has {width} output channels (one per score)"
        mine = np.concatenate([
            np.concatenate([_sigmoid(env[n.output[0]].detach().cpu().numpy().max(axis=1))
                            .reshape(len(env[n.output[0]]), -1) for n in logits], axis=1)
            for env in runs])
        if mine.shape != best.shape or \
                np.abs(np.sort(mine, axis=1) - best).max() > MATCH_TOLERANCE:
            return "the sigmoid of their highest logit is not the output's highest score"
        return ""
    return "no output with a score block"

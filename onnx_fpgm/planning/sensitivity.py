"""Per-group sensitivity: how much the model's output suffers when one group alone is pruned.

Pruning a group equals, by the oracle, zeroing the removed channels where their consumers read
them. So one onnxruntime session of the original, with a ``Mul`` by a per-channel mask (a graph
input) in front of every consumer of prunable channels, answers every "this group at that
sparsity" question by feeding other masks: no rewrite. A probe runs only the part of that model
downstream of the group's consumers (``downstream.py``: one session per group, the tensors
crossing into it cached from one reference run), not the whole model.

Loss of one measurement (larger is worse), against the unpruned outputs on the calibration data:
that of the output part that suffers most (see ``fidelity.output_parts`` and ``output_loss``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..deps.channels import Analysis, Group
from ..deps.constants import fold_constant_shapes
from ..deps.rewrite import apply_plan
from ..errors import ConfigError
from ..measure.calibration import Calibration, run_batched
from ..measure.fidelity import output_parts
from ..model import export, io
from ..model.memory import available_bytes
from ..model.runtime import make_session
from ..oracle.masking import consumer_axis
from ..recover.compensate import compensate, find_consumers
from ..recover.obs import gather_stats, updated_weights
from .downstream import PartRunner, chunks_of, downstream_part, run_reference

#: Calibration samples used per measurement on the exact path (and by the compensated one).
MAX_SAMPLES = 256
#: Samples per probe on the fast path: spread over the data, they rank groups as 256 do
#: (tests/test_sensitivity_speed.py). On YOLOv8n against 32 samples: rank correlation per
#: level 0.90-0.97 with 16, 0.84-0.93 with 8 (benchmarks/RESULTS.md, sensitivity_speed.py).
PROBE_SAMPLES = 16
#: A loss past which a group is clearly harmful: its higher sparsities are not measured but
#: extrapolated (the loss grows in proportion to the sparsity), so the allocation still avoids
#: them and never sees them as free.
HARMFUL_LOSS = 1.0
#: A loss at the highest level below which a group is clearly cheap: its lower levels are not
#: measured but interpolated (measured on YOLOv8n: 8 of 59 groups lose 0.02-0.04 at 0.8).
CHEAP_LOSS = 0.05


@dataclass
class MaskedModel:
    """The original with a mask input in front of every consumer of mapped channels."""

    proto: bytes
    masks: dict[str, tuple[np.ndarray, tuple[int, ...], np.dtype]]  # input -> labels, shape
    #: consumer -> (weight input, bias input or None), for consumers whose weights are fed
    weights: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def feeds(self, removed_atoms: np.ndarray) -> dict[str, np.ndarray]:
        return {name: (~removed_atoms[labels]).astype(dtype).reshape(shape)
                for name, (labels, shape, dtype) in self.masks.items()}


def build_masked_model(model: onnx.ModelProto, analysis: Analysis,
                       fed: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
                       ) -> MaskedModel:
    """Insert ``x * mask`` on every consumer input whose channels the analysis maps; the
    consumers named in ``fed`` (name -> weight, bias arrays) read their weight and bias from
    graph inputs instead (a compensated probe feeds updated ones)."""
    graph = gs.import_onnx(model)
    masks: dict[str, tuple[np.ndarray, tuple[int, ...], np.dtype]] = {}
    weights: dict[str, tuple[str, str | None]] = {}
    for node in graph.nodes:
        if fed and node.name in fed:
            weight, bias = fed[node.name]
            names = [f"{node.name}__sensitivity_weight", None]
            node.inputs[1] = gs.Variable(names[0], dtype=weight.dtype, shape=weight.shape)
            graph.inputs.append(node.inputs[1])
            if bias is not None:
                names[1] = f"{node.name}__sensitivity_bias"
                value = gs.Variable(names[1], dtype=bias.dtype, shape=bias.shape)
                graph.inputs.append(value)
                if len(node.inputs) > 2:
                    node.inputs[2] = value
                else:
                    node.inputs.append(value)
            weights[node.name] = (names[0], names[1])
    masked: dict[str, gs.Variable] = {}
    for node in list(graph.nodes):
        found = consumer_axis(node, analysis)
        if found is None:
            continue
        cmap = found[0]
        tensor = node.inputs[0]
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits"):
            # A QOperator layer reads integers: a removed channel is its zero point, which a
            # multiplicative mask cannot express.
            raise ConfigError(f"sensitivity allocation cannot mask the integer input of "
                              f"{node.op} {node.name}: use --allocation global or uniform")
        rank = analysis.ranks.get(tensor.name)
        if rank is None:
            continue
        if tensor.name not in masked:
            dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
            shape = [1] * rank
            shape[cmap.axis] = len(cmap.labels)
            name = f"{tensor.name}__sensitivity_mask"
            mask = gs.Variable(name, dtype=dtype, shape=shape)
            graph.inputs.append(mask)
            out = gs.Variable(f"{tensor.name}__sensitivity_masked", dtype=tensor.dtype)
            graph.nodes.append(gs.Node("Mul", f"{tensor.name}__sensitivity_mul",
                                       inputs=[tensor, mask], outputs=[out]))
            masks[name] = (cmap.labels, tuple(shape), dtype)
            masked[tensor.name] = out
        node.inputs[0] = masked[tensor.name]
    graph.toposort()
    proto = export.export_onnx(graph)
    proto.ir_version = model.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(model.opset_import)
    return MaskedModel(proto.SerializeToString(), masks, weights)


def output_loss(reference: list[np.ndarray], outputs: list[np.ndarray],
                labels: np.ndarray | None) -> float:
    """Loss of the worst output part: its relative error, plus with labels the drop in top-1
    accuracy (class scores), else the lost share of its top-1/top-k agreement."""
    loss = 0.0
    for want, have in zip(reference, outputs):
        if want.dtype.kind != "f":
            continue
        for part in output_parts(want, have):
            part_loss = part.relative_error
            if labels is not None and part.scores_want is not None:
                n = min(len(labels), len(part.scores_want))
                acc_want = np.mean(part.scores_want[:n].argmax(-1) == labels[:n])
                acc_have = np.mean(part.scores_have[:n].argmax(-1) == labels[:n])
                part_loss += float(acc_want - acc_have)
            elif part.top1 is not None:
                part_loss = max(part_loss, 1.0 - part.top1)
            loss = max(loss, part_loss)
    return loss


def measure_sensitivity(original: onnx.ModelProto, analysis: Analysis,
                        units: list[list[Group]], levels: tuple[float, ...],
                        select: Callable[[Analysis, Group, int], np.ndarray],
                        calibration: Calibration,
                        counts: Callable[[list[Group], float], list[int]],
                        progress: Callable[[int], None] | None = None, *,
                        samples: int | None = PROBE_SAMPLES,
                        harmful: float | None = HARMFUL_LOSS,
                        cheap: float | None = CHEAP_LOSS,
                        update: bool = False, downstream: bool = True) -> np.ndarray:
    """Loss (units x levels) when each unit alone keeps ``counts(unit, level)`` channels.

    Fast by default: ``samples`` calibration samples per probe (spread evenly over the first
    ``MAX_SAMPLES``), the highest level first and the others interpolated when it costs less
    than ``cheap``, else levels in increasing sparsity until one reaches ``harmful``, and a
    probe that removes the same channels as one before reuses its loss. ``samples=None,
    harmful=None, cheap=None`` is the exact path (every level on ``MAX_SAMPLES`` samples).

    With ``update``, each probe is followed by the closed-form OBS update of the consumers it
    touches (``recover.obs``: statistics gathered once, on other samples than the probes', so
    an update that only fits the probe samples is not judged cheap; the updated weights fed to
    the same session): what compensation cannot recover, without a rewrite, a fit or a session per
    probe. The update stands in for lstsq (both are least squares; lstsq on the pruned model's
    inputs, which for one group alone differ only downstream of its first consumer).

    With ``downstream`` (the default), each unit's probes run only the part of the masked model
    its consumers reach (``downstream.py``); without, the whole model (the losses agree to
    float rounding: tests/test_sensitivity_downstream.py).
    """
    calibration = _subset(calibration)
    fit_on = calibration
    if samples is not None and samples < calibration.n_samples:
        pick = np.unique(np.linspace(0, calibration.n_samples - 1, samples).round().astype(int))
        rest = np.setdiff1d(np.arange(calibration.n_samples), pick)
        if len(rest) >= len(pick):  # the update is fitted on other samples than it is judged on
            fit_on = _take(calibration, rest)
        calibration = _take(calibration, pick)
    stats, inputs, base = {}, {}, {}
    if update:
        everything = np.ones(analysis.n_atoms + 1, dtype=bool)
        everything[-1] = False
        consumers = find_consumers(original, analysis, everything)
        stats, _ = gather_stats(original, consumers, fit_on)
        inputs = {c.node: c.input for c in consumers if c.node in stats}
        base = {name: updated_weights(original, found, np.zeros(0, np.int64))
                for name, found in stats.items()}
    masked = build_masked_model(original, analysis, base)
    n_outputs = len(original.graph.output)
    names = [o.name for o in original.graph.output]

    def weight_feeds(removed_atoms: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {}
        for node, (w_name, b_name) in masked.weights.items():
            gone = np.flatnonzero(removed_atoms[analysis.maps[inputs[node]].labels])
            weight, bias = updated_weights(original, stats[node], gone) if len(gone) else \
                base[node]
            feeds[w_name] = weight
            if b_name is not None:
                feeds[b_name] = bias
        return feeds

    def feeds(removed_atoms: np.ndarray) -> dict[str, np.ndarray]:
        return {**masked.feeds(removed_atoms), **weight_feeds(removed_atoms)}

    if downstream:
        probes = _downstream_probes(masked, analysis, units, inputs, calibration, feeds)
    else:
        session = make_session(masked.proto, optimize=True)

        def run(removed_atoms: np.ndarray) -> list[np.ndarray]:
            return _run_with_masks(session, original, calibration, feeds(removed_atoms),
                                   names)[:n_outputs]

        reference = run(np.zeros(analysis.n_atoms + 1, dtype=bool))

        def probe(classes: np.ndarray) -> float:
            return output_loss(reference, run(analysis.removed_atoms(classes)),
                               calibration.labels)

        probes = (probe for _ in units)
    return _probe_levels(analysis, units, levels, select, counts, probes, progress, harmful,
                         cheap)


def _downstream_probes(masked: MaskedModel, analysis: Analysis, units: list[list[Group]],
                       inputs: dict[str, str], calibration: Calibration,
                       feeds: Callable[[np.ndarray], dict[str, np.ndarray]]
                       ) -> Iterator[Callable[[np.ndarray], float]]:
    """Per unit, in order: its probe (removed classes -> loss), one run of the part of the
    model downstream of the unit's consumers (``downstream.py``). The crossing tensors'
    reference values are cached by one run of the whole model per batch of units, batches
    sized to a quarter of the memory left."""
    model = onnx.load_from_string(masked.proto)
    fed = set(masked.masks) | {n for pair in masked.weights.values() for n in pair if n}
    parts = []
    for unit in units:
        classes = np.concatenate([g.classes for g in unit])
        atoms = analysis.removed_atoms(classes)
        changed = {name for name, (labels, _, _) in masked.masks.items() if atoms[labels].any()}
        for node, (w_name, b_name) in masked.weights.items():
            if atoms[analysis.maps[inputs[node]].labels].any():
                changed |= {w_name, b_name} - {None}
        parts.append(downstream_part(model, changed, fed))
    chunks = chunks_of(model, calibration)
    unchanged = feeds(np.zeros(analysis.n_atoms + 1, dtype=bool))
    batch_free = len({len(next(iter(c.values()))) for c in chunks}) > 1
    crossing = sorted({n for part in parts if part is not None for n in part.crossing})
    sizing = run_reference(model, chunks[:1], unchanged, crossing, batch_free).chunks[0]
    scale = calibration.n_samples / len(next(iter(chunks[0].values())))
    size = {n: v.nbytes * scale for n, v in sizing.items()}
    budget = available_bytes() // 4
    reference_outputs = None
    start = 0
    while start < len(units):
        batch, names = [], set()
        for part in parts[start:]:
            more = set(part.crossing) - names if part is not None else set()
            if batch and sum(size[n] for n in names | more) > budget:
                break
            batch.append(part)
            names |= more
        reference = run_reference(model, chunks, unchanged, sorted(names), batch_free)
        if reference_outputs is None:
            reference_outputs = reference.outputs
        for part in batch:
            if part is None:  # no output depends on the unit: removing it costs nothing
                yield lambda classes: 0.0
                continue
            runner = PartRunner(model, part, reference)

            def probe(classes: np.ndarray, runner: PartRunner = runner,
                      want: list[np.ndarray] = reference_outputs) -> float:
                return output_loss(want,
                                   runner.run(feeds(analysis.removed_atoms(classes))),
                                   calibration.labels)

            yield probe
        start += len(batch)


def _probe_levels(analysis: Analysis, units: list[list[Group]], levels: tuple[float, ...],
                  select, counts, probes: Iterable[Callable[[np.ndarray], float]], progress,
                  harmful: float | None, cheap: float | None) -> np.ndarray:
    """Loss per unit and level from ``probe(removed classes)`` (``probes``: one per unit, in
    order). With ``cheap``, the highest level is measured first: below ``cheap`` the lower
    levels are interpolated (in proportion to the sparsity). Then levels in increasing
    sparsity, past ``harmful`` extrapolated; a probe that removes the same channels as one
    measured before reuses its loss."""
    losses = np.zeros((len(units), len(levels)))
    for u, (unit, probe) in enumerate(zip(units, probes)):
        known: dict[bytes, float] = {}

        def loss_at(level: float, unit: list[Group] = unit, probe=probe,
                    known: dict[bytes, float] = known) -> float:
            classes = _removed_classes(analysis, unit, counts(unit, level), select)
            key = classes.tobytes()
            if key not in known:
                known[key] = probe(classes) if len(classes) else 0.0
            return known[key]

        top = loss_at(levels[-1]) if cheap is not None else None
        if top is not None and top < cheap:
            losses[u] = top * np.asarray(levels) / levels[-1]
        else:
            for j, level in enumerate(levels):
                if top is not None and j == len(levels) - 1:
                    losses[u, j] = top  # measured first
                elif harmful is not None and j and losses[u, j - 1] >= harmful:
                    losses[u, j] = losses[u, j - 1] * level / levels[j - 1]
                else:
                    losses[u, j] = loss_at(level)
        if progress is not None:
            progress(len(levels))
    return losses


def _take(calibration: Calibration, pick: np.ndarray) -> Calibration:
    return Calibration({k: v[pick] for k, v in calibration.inputs.items()},
                       None if calibration.labels is None else calibration.labels[pick])


def _subset(calibration: Calibration) -> Calibration:
    return Calibration({k: v[:MAX_SAMPLES] for k, v in calibration.inputs.items()},
                       None if calibration.labels is None else calibration.labels[:MAX_SAMPLES])


def _removed_classes(analysis: Analysis, unit: list[Group], keeps: list[int],
                     select: Callable[[Analysis, Group, int], np.ndarray]) -> np.ndarray:
    """Classes that go when each group of ``unit`` keeps its count (chosen by ``select``)."""
    removed = [group.classes[np.asarray(select(analysis, group, group.n_channels - keep))]
               for group, keep in zip(unit, keeps) if keep < group.n_channels]
    return np.sort(np.concatenate(removed)) if removed else np.zeros(0, np.int64)


def _run_with_masks(session, model: onnx.ModelProto, calibration: Calibration,
                    masks: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """``run_batched`` with the same mask feeds added to every chunk."""

    class _WithMasks:
        def run(self, outputs, feeds):
            return session.run(outputs, {**feeds, **masks})

    return run_batched(_WithMasks(), model, calibration, names)


def measure_compensated_sensitivity(original: onnx.ModelProto, shapes: onnx.ModelProto,
                                    opset: int, analysis: Analysis,
                                    units: list[list[Group]], levels: tuple[float, ...],
                                    select: Callable[[Analysis, Group, int], np.ndarray],
                                    calibration: Calibration,
                                    counts: Callable[[list[Group], float], list[int]],
                                    mode: str,
                                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Like ``measure_sensitivity``, but each measurement is the real rewrite followed by
    ``mode`` compensation: with compensation, what matters is what it cannot recover (a group
    whose removal lstsq undoes is cheap, however large its raw error). One rewrite and one fit
    per measurement: slower, so only used when compensation is asked for."""

    calibration = _subset(calibration)
    reference = run_batched(make_session(original, optimize=True), original, calibration)
    losses = np.zeros((len(units), len(levels)))
    for u, unit in enumerate(units):
        for j, level in enumerate(levels):
            classes = _removed_classes(analysis, unit, counts(unit, level), select)
            if len(classes):
                graph = io.import_graph(original, shapes)
                fold_constant_shapes(graph)
                apply_plan(graph, analysis, classes, opset)
                pruned = export.export_graph(graph, original, None)
                consumers = find_consumers(original, analysis, analysis.removed_atoms(classes))
                model, _ = compensate(original, pruned, consumers, mode, calibration)
                outputs = run_batched(make_session(model, optimize=True), original, calibration)
                losses[u, j] = output_loss(reference, outputs, calibration.labels)
            if progress is not None:
                progress(1)
    return losses

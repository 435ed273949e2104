"""The data-aware criterion (``criterion="obs"``) and the closed-form OBS update (``--compensate
obs``), both from the consumers' input statistics on the calibration data.

For every consumer of prunable channels (Conv with group 1, Gemm, MatMul: the layers
``find_consumers`` lists, the ones lstsq refits) the original model runs once on the calibration
data with their inputs exposed; each input becomes design rows (``layers.design_rows``, plus a
column of ones for the bias), and ``H = A^T A`` is accumulated chunk by chunk, so only one chunk's
activations are in memory. ``importance.obs`` turns ``H^-1`` and the weights into a greedy
removal order per group (the channels whose removal, after refitting the rest, raises the
consumers' squared output error least, relative to their output energy).

A group none of whose channels reaches such a consumer, or one with a channel that reaches none
(it feeds only layers the statistics do not model: a graph output, a quantized or dynamic weight,
a layer wider than ``MAX_WIDTH`` design columns), is scored by FPGM instead, and said so in a note.

The update: ``W_keep -= W_Q (H^-1_QQ)^-1 H^-1_{Q,keep}`` per consumer (bias included, as the
ones column is never removed). It is least squares on the *original* inputs, all consumers at
once; ``lstsq`` refits on the pruned model's own inputs layer after layer, which also absorbs the
error of the layers before (usually better on deep stacks, one model run per consumer).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..deps.channels import Analysis, Group
from ..importance.obs import ObsLayer, ObsOrder, greedy_obs_order, inverse_hessian, obs_update
from ..measure.calibration import Calibration, run_batched, static_batch
from ..model.runtime import make_session
from .confidence import teacher_confidence
from .layers import (
    Consumer,
    attr,
    bias_of,
    constant,
    design_rows,
    expose,
    find_consumers,
    first_samples,
    fits_conv,
    node_named,
    rows_to_weight,
    weight_rows,
    write_weight_rows,
)

logger = logging.getLogger(__name__)

#: Calibration samples the statistics are gathered on.
MAX_SAMPLES = 256
#: Design rows per consumer (spread over the samples) that ``H`` is summed over.
MAX_ROWS = 8192
#: Samples per model run while gathering (bounds the activations held at once).
CHUNK = 32
#: Widest design (input columns) whose Hessian is formed (``MAX_WIDTH^2`` float64s).
MAX_WIDTH = 4608
#: The update's statistics of a detector's class-score layers weighted by the teacher's
#: confidence, as ``sequential`` weights them (``confidence.py``). Off: an experiment, measured
#: once on YOLOv8n (benchmarks/RESULTS.md); the criterion's statistics are never weighted.
CONFIDENCE_WEIGHTS = False
#: Damping of ``H``, relative to its mean diagonal.
DAMPING = 1e-2


@dataclass
class ConsumerStats:
    """One consumer's weights and inverse damped Hessian over its design columns.

    Attributes:
        node: the consumer's name.
        weight: (out, D) effective weight rows; the last column is the bias when ``with_bias``.
        hinv: (D, D) inverse of the damped ``A^T A``.
        channel: per design column, its position on the input's channel axis (-1: the bias).
        energy: squared norm of the consumer's outputs over the rows gathered.
    """

    node: str
    weight: np.ndarray
    hinv: np.ndarray
    channel: np.ndarray
    energy: float


def gather_stats(original: onnx.ModelProto, consumers: list[Consumer],
                 calibration: Calibration, weighted: bool = False
                 ) -> tuple[dict[str, ConsumerStats], dict[str, str]]:
    """Statistics of every consumer that has a float weight and a design we can form; the
    others with the reason they are left out. ``weighted``: a class-score layer's rows count
    by the teacher's confidence (``confidence.py``)."""
    skipped: dict[str, str] = {}
    wanted: dict[str, tuple[onnx.NodeProto, np.ndarray, np.ndarray, np.ndarray]] = {}
    for consumer in consumers:
        node = node_named(original, consumer.node)
        reason, rows, channel = design_of(original, node)
        if reason:
            skipped[consumer.node] = reason
            continue
        wanted[consumer.node] = (node, constant(original, node.input[1]), rows, channel)
    if not wanted:
        return {}, skipped
    data = first_samples(calibration, MAX_SAMPLES)
    batch = static_batch(original, data) or 1
    if data.n_samples < batch:
        return {}, {name: f"fewer calibration samples than the model's fixed batch {batch}"
                    for name in wanted} | skipped
    step = max(CHUNK // batch, 1) * batch  # whole batches: run_batched steps by a fixed one
    usable = data.n_samples // batch * batch
    names = list(dict.fromkeys(node.input[0] for node, _, _, _ in wanted.values()))
    session = make_session(expose(original, names), optimize=True)
    grams: dict[str, np.ndarray] = {}
    quota = math.ceil(MAX_ROWS / math.ceil(usable / step))  # rows per chunk
    rng = np.random.default_rng(0)
    weights = teacher_confidence(original, first_samples(data, usable), set(wanted))[0] \
        if weighted else None
    for start in range(0, usable, step):
        chunk = Calibration({k: v[start:min(start + step, usable)]
                             for k, v in data.inputs.items()})
        values = dict(zip(names, run_batched(session, original, chunk, names)))
        for name, (node, weight, _, channel) in wanted.items():
            x = values[node.input[0]]
            if node.op_type == "Conv":  # unfold only the samples the quota needs
                positions = int(np.prod(x.shape[2:])) // int(np.prod(attr(node, "strides",
                                                                           [1, 1])))
                x = x[:max(1, math.ceil(2 * quota / max(positions, 1)))]
            a = design_rows(node, weight, x.astype(np.float32))
            w = None if weights is None else weights.row_weights(name, start, start + len(x))
            if len(a) > quota:
                pick = np.sort(rng.choice(len(a), quota, replace=False))
                a, w = a[pick], None if w is None else w[pick]
            if channel[-1] < 0:  # the ones column of the bias
                a = np.concatenate([a, np.ones((len(a), 1), a.dtype)], 1)
            rows_in = a if w is None else a * w[:, None]
            gram = (rows_in.T @ a).astype(np.float64)  # float32 products, float64 sums
            grams[name] = grams[name] + gram if name in grams else gram
    stats = {}
    for name, (_, _, rows, channel) in wanted.items():
        gram = grams[name]
        energy = float(np.sum((rows @ gram) * rows))  # a product, not einsum's loop
        stats[name] = ConsumerStats(name, rows, inverse_hessian(gram, DAMPING), channel, energy)
    return stats, skipped


def design_of(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[str, np.ndarray | None,
                                                                       np.ndarray | None]:
    """(why not, or ""; weight rows with the bias column last; input channel per column)."""
    weight = constant(model, node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.dtype.kind != "f":
        return "its weight is not a stored float tensor", None, None
    if node.op_type == "Conv" and not fits_conv(node, weight):
        return "a Conv form the statistics do not unfold", None, None
    if node.op_type != "Conv" and weight.ndim != 2:
        return f"a {weight.ndim}-D {node.op_type} weight", None, None
    rows = weight_rows(node, weight)
    per_channel = int(np.prod(weight.shape[2:])) if node.op_type == "Conv" else 1
    channel = np.arange(rows.shape[1]) // per_channel
    bias = bias_of(model, node, len(rows))
    if bias is None and node.op_type != "MatMul":
        return "its bias is computed", None, None
    if bias is not None:
        rows = np.concatenate([rows, bias[:, None]], 1)
        channel = np.r_[channel, -1]
    if rows.shape[1] > MAX_WIDTH:
        return f"{rows.shape[1]} input columns (more than {MAX_WIDTH})", None, None
    return "", rows, channel


class ObsCriterion:
    """``SelectFn`` of the OBS criterion (and per-channel scores for the allocation), with FPGM
    where it cannot apply. Statistics are gathered on first use; each group's greedy order is
    computed once (for the most channels asked so far) and reused by every later count."""

    def __init__(self, original: onnx.ModelProto, analysis: Analysis, calibration: Calibration,
                 fallback: Callable[[Analysis, Group, int], np.ndarray],
                 fallback_scores: Callable[[Group], np.ndarray]) -> None:
        self._original = original
        self._analysis = analysis
        self._calibration = calibration
        self._fallback = fallback
        self._fallback_scores = fallback_scores
        self._stats: dict[str, ConsumerStats] | None = None
        self._skipped: dict[str, str] = {}
        self._consumers: list[Consumer] = []
        self._orders: dict[bytes, ObsOrder] = {}
        self._fell_back: dict[int, str] = {}

    @property
    def notes(self) -> list[str]:
        """One note naming the groups FPGM scored instead, and why (empty when none)."""
        if not self._fell_back:
            return []
        shown = [f"{self._analysis.groups[g].producers[0]} ({why})"
                 for g, why in list(self._fell_back.items())[:6]]
        more = ", ..." if len(self._fell_back) > 6 else ""
        return [(f"criterion obs: {len(self._fell_back)} group(s) scored by FPGM instead: "
                 f"{'; '.join(shown)}{more}")]

    def __call__(self, analysis: Analysis, group: Group, n_prune: int) -> np.ndarray:
        order = self._order(group, n_prune)
        if order is None:
            return self._fallback(analysis, group, n_prune)
        return np.sort(order.order[:n_prune])

    def scores(self, group: Group) -> np.ndarray:
        """Per channel: the relative error added when the greedy pass removes it (monotone)."""
        order = self._order(group, group.n_channels - 1)
        if order is None:
            return self._fallback_scores(group)
        return order.scores(group.n_channels)

    def _order(self, group: Group, n_remove: int) -> ObsOrder | None:
        key = group.classes.tobytes()
        known = self._orders.get(key)
        if known is not None and len(known.order) >= min(n_remove, group.n_channels - 1):
            return known
        if group.id in self._fell_back:
            return None
        layers, reason = self._layers(group)
        if layers is None:
            self._fell_back[group.id] = reason
            logger.info("criterion obs: group of %s scored by FPGM: %s", group.producers[0],
                        reason)
            return None
        want = max(n_remove, len(known.order) if known is not None else 0)
        self._orders[key] = greedy_obs_order(layers, group.n_channels, want)
        return self._orders[key]

    def _layers(self, group: Group) -> tuple[list[ObsLayer] | None, str]:
        analysis = self._analysis
        if self._stats is None:
            everything = np.ones(analysis.n_atoms + 1, dtype=bool)
            everything[-1] = False
            self._consumers = find_consumers(self._original, analysis, everything)
            self._stats, self._skipped = gather_stats(self._original, self._consumers,
                                                      self._calibration)
        position = np.full(len(analysis.class_blocked) + 1, -1, dtype=np.int64)
        position[group.classes] = np.arange(group.n_channels)
        layers, covered, skipped = [], np.zeros(group.n_channels, dtype=bool), []
        for consumer in self._consumers:
            labels = analysis.maps[consumer.input].labels
            classes = np.where(labels >= 0, analysis.class_of_atom[labels], -1)
            if not np.any(position[classes] >= 0):
                continue
            stats = self._stats.get(consumer.node)
            if stats is None:
                skipped.append(f"{consumer.node}: {self._skipped[consumer.node]}")
                continue
            col_pos = np.where(stats.channel >= 0, position[classes[stats.channel]], -1)
            inside = np.flatnonzero(col_pos >= 0)
            local = col_pos[inside]
            layers.append(ObsLayer(stats.weight[:, inside], stats.hinv[np.ix_(inside, inside)],
                                   [np.flatnonzero(local == c) for c in range(group.n_channels)],
                                   stats.energy))
            covered[np.unique(local)] = True
        if skipped:
            return None, f"consumer {skipped[0]}"
        if not layers:
            return None, "no Conv/Gemm/MatMul consumer reads its channels"
        if not covered.all():
            return None, f"{int(np.count_nonzero(~covered))} channel(s) reach no such consumer"
        return layers, ""


def compensate_obs(original: onnx.ModelProto, model: onnx.ModelProto,
                   consumers: list[Consumer], calibration: Calibration) -> list[Consumer]:
    """Apply the OBS update to every consumer it can serve (in ``model``, in place); return the
    consumers left for another method."""
    stats, _ = gather_stats(original, consumers, calibration, CONFIDENCE_WEIGHTS)
    left = []
    for consumer in consumers:
        found = stats.get(consumer.node)
        if found is None:
            left.append(consumer)
            continue
        gone = np.isin(found.channel, consumer.removed)
        rows = obs_update(found.weight, found.hinv, np.flatnonzero(gone))
        keep = ~gone & (found.channel >= 0)
        bias = rows[:, -1] if found.channel[-1] < 0 else None
        rows = rows[:, keep]
        if consumer.kept_out is not None:
            rows = rows[consumer.kept_out]
            bias = None if bias is None else bias[consumer.kept_out]
        pnode = node_named(model, consumer.node)
        write_weight_rows(model, pnode, constant(model, pnode.input[1]), rows, bias)
    return left


def updated_weights(original: onnx.ModelProto, found: ConsumerStats,
                    removed: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The consumer's weight and bias in its own layout and shape after the OBS update for
    removing the input channel positions ``removed`` (their slices zero, nothing sliced off)."""
    node = node_named(original, found.node)
    gone = np.isin(found.channel, removed)
    rows = obs_update(found.weight, found.hinv, np.flatnonzero(gone))
    bias = rows[:, -1] if found.channel[-1] < 0 else None
    return rows_to_weight(node, constant(original, node.input[1]), rows[:, found.channel >= 0],
                          bias)

"""``onnx-fpgm sweep IN``: how far can a model go? One pruned model per target and allocation
(and compensation, when asked), each with its MACs, params, latency and fidelity/accuracy on
real data, as a table, JSON and a plot.

Sensitivities and channel scores are measured once and shared by every point (``prune``'s
``cache``). Latency is measured interleaved with the original, as ``--benchmark`` does.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..api import prune
from ..config import PruneConfig
from ..errors import ConfigError, OnnxFpgmError
from ..measure.bench import benchmark
from ..model import mapped
from ..model.files import atomic_file
from ..report import say

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
PLOT_EXTRA = "onnx-fpgm[plot]"


@dataclass
class SweepPoint:
    """One pruned model of the sweep."""

    allocation: str
    compensation: str
    target: float
    macs: float | None = None  # fraction of the original
    params: float | None = None
    latency_ms: float | None = None
    original_latency_ms: float | None = None
    cosine: float | None = None  # worst output
    relative_error: float | None = None  # worst output
    top1_agreement: float | None = None
    accuracy: float | None = None
    accuracy_original: float | None = None
    error: str | None = None  # why there is no model (e.g. an unreachable target)

    @property
    def speedup(self) -> float | None:
        if self.latency_ms and self.original_latency_ms:
            return self.original_latency_ms / self.latency_ms
        return None


@dataclass
class Sweep:
    model: str
    metric: str
    fidelity_on: str
    points: list[SweepPoint] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "metric": self.metric, "fidelity_on": self.fidelity_on,
                "points": [{**asdict(p), "speedup": p.speedup} for p in self.points]}


def run_sweep(model: str, targets: tuple[float, ...], allocations: tuple[str, ...], *,
              metric: str = "macs", compensations: tuple[str, ...] = ("none",),
              base: PruneConfig | None = None, latency_runs: int = 20,
              progress: Callable[[str, int], Callable[[int], None]] | None = None,
              loaded: mapped.Loaded | None = None) -> Sweep:
    """Prune ``model`` at every (allocation, compensation, target) and measure each result."""
    base = base or PruneConfig()
    if "sensitivity" in allocations and not base.calibration:
        raise ConfigError("allocation sensitivity needs --calibration data")
    if loaded is None:  # once, weights mapped or viewed: not per point
        loaded = mapped.load_mapped(model)
    fidelity_on = "evaluation" if base.evaluation else "calibration" if base.calibration else ""
    sweep = Sweep(str(model), metric, fidelity_on)
    caches: dict[str, dict] = {}
    total = len(targets) * len(allocations) * len(compensations)
    advance = progress("sweep", total) if progress else None
    with mapped.reading_from(loaded):
        for allocation, compensation, target in itertools.product(allocations, compensations,
                                                                  targets):
            label = compensation if base.recover == "none" else \
                f"{compensation}+{base.recover}"  # every point is recovered after compensation
            point = SweepPoint(allocation, label, target)
            sweep.points.append(point)
            _measure_point(point, loaded, _config(base, metric, target, allocation, compensation),
                           caches.setdefault(allocation, {}), latency_runs)
            if advance:
                advance(1)
    return sweep


def _measure_point(point: SweepPoint, loaded, config: PruneConfig, cache: dict,
                   latency_runs: int) -> None:
    try:
        result = prune(loaded, config=config, cache=cache)
    except OnnxFpgmError as err:
        point.error = str(err)
        return
    report = result.report
    point.macs = report.after.macs / report.before.macs if report.before.macs else 1.0
    point.params = report.after.params / report.before.params
    _fill_fidelity(point, report.fidelity_data)
    if latency_runs:
        lat = benchmark(loaded.model, result.model, runs=latency_runs, warmup=3,
                        input_shapes=result.input_sizes.primary)
        point.latency_ms, point.original_latency_ms = lat.pruned_ms, lat.original_ms


def _config(base: PruneConfig, metric: str, target: float, allocation: str,
            compensation: str) -> PruneConfig:
    from dataclasses import replace

    return replace(base, target_macs=target if metric == "macs" else None,
                   target_params=target if metric == "params" else None,
                   allocation=allocation, compensate=compensation)


def _fill_fidelity(point: SweepPoint, data: list[dict]) -> None:
    """The worst output's figures (the weakest part decides whether a model is usable)."""
    if not data:
        return
    point.cosine = min(d["cosine"] for d in data)
    point.relative_error = max(d["relative_error"] for d in data)
    tops = [d["top1_agreement"] for d in data if d.get("top1_agreement") is not None]
    point.top1_agreement = min(tops) if tops else None
    accs = [(d["accuracy_pruned"], d["accuracy_original"]) for d in data
            if d.get("accuracy_pruned") is not None]
    if accs:
        point.accuracy, point.accuracy_original = min(accs)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_sweep(sweep: Sweep, console) -> None:
    """The sweep as one rich table, a row per point."""
    from rich.table import Table

    table = Table(title=f"Sweep of {sweep.model} (target: {sweep.metric})", title_justify="left")
    columns = ["allocation", "comp.", "target", "MACs", "params", "ms", "speedup", "cosine",
               "rel.err", "top-1", "acc."]
    for col in columns:
        table.add_column(col, no_wrap=True)
    for p in sweep.points:
        if p.error:
            table.add_row(p.allocation, p.compensation, f"{p.target:g}",
                          *(["-"] * (len(columns) - 4)), "unreachable"
                          if "not reachable" in p.error else "failed")
            continue
        table.add_row(p.allocation, p.compensation, f"{p.target:g}", f"{p.macs:.3f}",
                      f"{p.params:.3f}",
                      "-" if p.latency_ms is None else f"{p.latency_ms:.2f}",
                      "-" if p.speedup is None else f"{p.speedup:.2f}x",
                      "-" if p.cosine is None else f"{p.cosine:.4f}",
                      "-" if p.relative_error is None else f"{p.relative_error:.3g}",
                      _pct(p.top1_agreement), _pct(p.accuracy))
    console.print(table)
    for p in sweep.points:
        if p.error:
            say(console, f"{p.allocation}/{p.compensation} at {p.target:g}: {p.error}")
    if sweep.fidelity_on:
        console.print(f"fidelity and accuracy on the {sweep.fidelity_on} data; worst output")
    originals = [p.accuracy_original for p in sweep.points if p.accuracy_original is not None]
    if originals:
        console.print(f"original accuracy: {100 * originals[0]:.2f}%")


def require_matplotlib():
    """matplotlib (optional extra ``plot``), or a ConfigError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"--plot needs matplotlib: pip install '{PLOT_EXTRA}'") from err
    return plt


def plot_sweep(sweep: Sweep, path: str) -> None:
    """Accuracy (or fidelity) vs MACs and latency vs MACs, one line per allocation."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    accuracy = any(p.accuracy is not None for p in sweep.points)
    series: dict[tuple[str, str], list[SweepPoint]] = {}
    for p in sweep.points:
        if not p.error:
            series.setdefault((p.allocation, p.compensation), []).append(p)
    for (allocation, compensation), points in series.items():
        points = sorted(points, key=lambda p: p.macs)
        label = allocation if compensation == "none" else f"{allocation} + {compensation}"
        xs = [p.macs for p in points]
        ys = [100 * p.accuracy if accuracy else p.cosine for p in points]
        if any(y is not None for y in ys):
            left.plot(xs, [math.nan if y is None else y for y in ys], "o-", label=label,
                      markersize=3)
        lat = [p.latency_ms for p in points]
        if any(v is not None for v in lat):
            right.plot(xs, [math.nan if v is None else v for v in lat], "o-", label=label,
                       markersize=3)
    originals = [p for p in sweep.points if p.original_latency_ms]
    if originals:
        right.axhline(originals[0].original_latency_ms, color="grey", linestyle=":",
                      label="original")
    left.set_xlabel("MACs (fraction of the original)")
    left.set_ylabel("accuracy %" if accuracy else "worst-output cosine")
    left.set_title(f"{'accuracy' if accuracy else 'fidelity'} on {sweep.fidelity_on} data"
                   if sweep.fidelity_on else "fidelity")
    right.set_xlabel("MACs (fraction of the original)")
    right.set_ylabel("latency (ms)")
    right.set_title("onnxruntime latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_file(path, "--plot") as handle:  # exclusive temp file, then one rename
            fig.savefig(handle, format=Path(path).suffix[1:].lower() or "png")
    finally:
        plt.close(fig)

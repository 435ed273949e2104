"""What a run did, as data (JSON) and as the table the CLI prints."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .deps.reasons import classify
from .measure.bench import LatencyResult, ModelSize
from .planning.allocate import TargetOutcome
from .recover.recovery_report import RecoveryReport


@dataclass
class LayerReport:
    """One producer's output channels before and after; ``kept`` are the kept indices.

    ``filter_size`` (elements per filter) lets ``--plan`` match this producer in another export.
    """

    name: str
    op: str
    channels_before: int
    channels_after: int
    kept: list[int]
    group: int
    filter_size: int | None = None


@dataclass
class GroupReport:
    """One group of coupled channels (``heads``: its units are whole attention heads;
    ``head_dims``: entries of ``head_dim`` within the kept heads)."""

    id: int
    producers: list[str]
    channels_before: int
    channels_after: int
    sparsity: float
    frozen: str | None
    heads: bool = False
    head_dims: bool = False


@dataclass
class Report:
    """Everything a run measured and decided."""

    layers: list[LayerReport] = field(default_factory=list)
    groups: list[GroupReport] = field(default_factory=list)
    blocked_tensors: list[tuple[str, str]] = field(default_factory=list)
    before: ModelSize | None = None
    after: ModelSize | None = None
    verification: dict[str, Any] | None = None
    latency: LatencyResult | None = None
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    prunable_channels: int = 0
    total_channels: int = 0
    compensation: str = "none"
    fidelity_on: str = ""
    fidelity: list[str] = field(default_factory=list)
    fidelity_data: list[dict[str, Any]] = field(default_factory=list)
    #: Input sizes used for verification, MACs and shape inference (see ``input_sizes``).
    input_sizes: dict[str, Any] = field(default_factory=dict)
    target: TargetOutcome | None = None
    #: What ``--recover`` did (None without it).
    recovery: RecoveryReport | None = None
    #: Graph inputs/outputs that shrank (``--allow-interface-change``: KV caches with their
    #: heads): name, kind, axis, declared shape before and after.
    interface_changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return self.prunable_channels / self.total_channels if self.total_channels else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocked_tensors"] = [{"tensor": t, "reason": r} for t, r in self.blocked_tensors]
        data["coverage"] = {"prunable_channels": self.prunable_channels,
                            "total_channels": self.total_channels,
                            "fraction": round(self.coverage, 6)}
        if self.latency is not None:
            data["latency"]["speedup"] = self.latency.speedup
        for key in ("prunable_channels", "total_channels"):
            data.pop(key)
        return data

    def to_json(self, timings: bool = True) -> str:
        data = self.to_dict()
        if not timings:
            data.pop("timings_s")
            data.pop("latency")
        return json.dumps(data, indent=2, sort_keys=True, default=float)


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _sizes_line(sizes: dict[str, Any], verified: bool) -> str:
    def text(shapes):
        return " ".join(f"{n}={','.join(map(str, s))}" for n, s in shapes.items())

    how = "given" if sizes.get("given") else "chosen by running the original"
    second = sizes.get("secondary")
    also = "also verified at" if verified else "second set"
    extra = f"; {also} {text(second)}" if second else "; it ran at no second size tried"
    return f"{text(sizes['primary'])} ({how}{extra})"


def printable(text: str) -> str:
    """``text`` with control characters (ANSI/OSC escapes, newlines) shown escaped: names come
    from the model file and are never sent raw to the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _plain(value: object):
    """A rich ``Text`` (never parsed as markup: a node named ``conv[/evil]1`` prints as is)."""
    from rich.text import Text

    return Text(printable(str(value)))


def say(console, text: str) -> None:
    """Print one line of text (``printable``, never parsed as markup)."""
    console.print(_plain(text))


def _add_row(table, *cells: object) -> None:
    table.add_row(*map(_plain, cells))


#: The default output lists why channels stay when at most this fraction of them is prunable.
MOSTLY_WHOLE = 0.5
#: How many blocking reasons it lists (those that block the most channels).
TOP_REASONS = 3


@dataclass(frozen=True)
class BlockingReason:
    """One frozen reason and how much it blocks (``kind``: its category in ``deps.reasons``)."""

    reason: str
    channels: int
    groups: int
    kind: str | None


def top_frozen_reasons(report: Report, n: int = TOP_REASONS) -> list[BlockingReason]:
    """The ``n`` frozen reasons that block the most channels, most first."""
    channels: dict[str, int] = {}
    groups: dict[str, int] = {}
    for g in report.groups:
        if g.frozen:
            channels[g.frozen] = channels.get(g.frozen, 0) + g.channels_before
            groups[g.frozen] = groups.get(g.frozen, 0) + 1
    ranked = sorted(channels, key=lambda r: (-channels[r], r))[:n]
    return [BlockingReason(r, channels[r], groups[r],
                           kind.title if (kind := classify(r)) else None) for r in ranked]


def _render_blocking(report: Report, console) -> None:
    """Why a model stays whole or mostly whole, without a second run under --dry-run."""
    frozen = sum(g.channels_before for g in report.groups if g.frozen)
    whole = not any(g.channels_after < g.channels_before for g in report.groups)
    if not frozen or (report.coverage > MOSTLY_WHOLE and not whole):
        return
    reasons = top_frozen_reasons(report)
    distinct = len({g.frozen for g in report.groups if g.frozen})
    more = f" (the {len(reasons)} that block the most of {distinct} reasons; all with " \
        "--dry-run)" if distinct > len(reasons) else ""
    say(console, f"blocked: {frozen:,} channels in "
                 f"{sum(1 for g in report.groups if g.frozen)} frozen group(s), by{more}:")
    for r in reasons:
        kind = f"[{r.kind}] " if r.kind else ""
        say(console, f"  {r.channels:,} channels, {r.groups} group(s): {kind}{r.reason}")


def render(report: Report, console, dry_run: bool = False) -> None:
    """Print the per-layer (or per-group, for --dry-run) table and the totals with rich."""
    from rich.table import Table

    if dry_run:
        table = Table(title="Channel groups", title_justify="left")
        for col in ("group", "producers", "channels", "would keep", "status"):
            table.add_column(col, overflow="fold")
        for g in report.groups:
            producers = ", ".join(g.producers[:4]) + (" ..." if len(g.producers) > 4 else "")
            unit = " heads" if g.heads else " head dims" if g.head_dims else ""
            _add_row(table, str(g.id), producers, f"{g.channels_before}{unit}",
                     f"{g.channels_after}{unit}", "frozen: " + g.frozen if g.frozen else "prunable")
        console.print(table)
        if report.blocked_tensors:
            blocked = Table(title="Blocked tensors", title_justify="left")
            blocked.add_column("tensor", overflow="fold")
            blocked.add_column("reason", overflow="fold")
            for name, reason in report.blocked_tensors:
                _add_row(blocked, name, reason)
            console.print(blocked)
    else:
        table = Table(title="Pruned layers", title_justify="left")
        for col in ("layer", "op", "channels", "group"):
            table.add_column(col, overflow="fold")
        for layer in report.layers:
            mark = "" if layer.channels_after < layer.channels_before else " (kept)"
            _add_row(table, layer.name, layer.op,
                     f"{layer.channels_before} -> {layer.channels_after}{mark}", str(layer.group))
        console.print(table)
        _render_blocking(report, console)
    say(console, f"coverage: {report.prunable_channels} / {report.total_channels} conv and "
                 f"MLP output channels are prunable ({100 * report.coverage:.1f}%)")
    if report.before and report.after:
        b, a = report.before, report.after
        say(console,
             f"params: {b.params:,} -> {a.params:,} ({_ratio(b.params, a.params)} smaller)")
        say(console, f"MACs:   {b.macs:,} -> {a.macs:,} ({_ratio(b.macs, a.macs)} fewer)")
        say(console, f"size:   {b.bytes:,} -> {a.bytes:,} bytes")
    if report.input_sizes.get("symbolic_dims"):
        verified = report.verification is not None
        say(console, f"input sizes: {_sizes_line(report.input_sizes, verified)}")
    if report.target is not None:
        render_target(report.target, console)
    if report.verification is not None:
        v = report.verification
        say(console, f"verify: {'passed' if v['passed'] else 'FAILED'} - {v['summary']}")
    if report.compensation != "none":
        say(console, f"compensation: {report.compensation}")
    if report.recovery is not None:
        say(console, report.recovery.summary())
        for line in report.recovery.fidelity_before:
            say(console, f"before recovery, on {report.fidelity_on} data: {line}")
    for line in report.fidelity:
        say(console, f"fidelity on {report.fidelity_on} data: {line}")
    if report.latency is not None:
        lat = report.latency
        say(
            console,
            f"latency ({lat.provider}, median of {lat.runs}): {lat.original_ms:.2f} ms "
            f"(IQR {lat.original_iqr_ms:.2f}) -> {lat.pruned_ms:.2f} ms "
            f"(IQR {lat.pruned_iqr_ms:.2f}), speedup {lat.speedup:.2f}x")
    for change in report.interface_changes:
        say(console, f"interface change: {change['kind']} {change['name']}: "
                     f"{_dims(change['before'])} -> {_dims(change['after'])} "
                     f"({_axes(change)})")
    for note in report.notes:
        say(console, f"note: {note}")


def _axes(change: dict) -> str:
    """Which axes of an interface change shrank, each named: 'heads on axis 1, ...'."""
    names = {change.get("heads_axis"): "heads", change.get("head_dim_axis"): "head_dim"}
    axes = change.get("axes", [change["axis"]])
    return ", ".join(f"{names.get(a, 'channels')} on axis {a}" for a in axes)


def _dims(dims: list) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def render_target(outcome: TargetOutcome, console) -> None:
    """The target line and the sparsity chosen for every group that lost channels."""
    from rich.table import Table

    table = Table(title=f"Per-group sparsity ({outcome.allocation} allocation)",
                  title_justify="left")
    for col in ("group", "producers", "channels", "kept", "sparsity"):
        table.add_column(col, overflow="fold")
    for g in outcome.groups:
        producers = ", ".join(g["producers"][:3]) + (" ..." if len(g["producers"]) > 3 else "")
        _add_row(table, str(g["id"]), producers, str(g["channels"]), str(g["kept"]),
                 f"{g['sparsity']:.3f}")
    console.print(table)
    say(console, outcome.summary())

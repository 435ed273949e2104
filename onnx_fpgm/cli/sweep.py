"""``onnx-fpgm sweep IN``: the sweep subcommand's arguments and run (see ``outcome/sweep.py``).

``sweep`` as the first argument is the subcommand; a model file literally named ``sweep`` is
pruned by writing its path another way (``./sweep``), and the error for a missing IN says so.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from ..config import ALLOCATIONS, RECOVER_STEPS, RECOVERIES, PruneConfig, check_target
from ..errors import ConfigError, ModelLoadError
from ..model import mapped
from ..model.files import FilePlan, write_text
from ..model.runtime import limit_sessions
from ..outcome.sweep import DEFAULT_TARGETS, plot_sweep, render_sweep, require_matplotlib, run_sweep
from ..report import say
from .common import Parser, ProgressBars, parse_input_shape

SWEEP_ALLOCATIONS = tuple(a for a in ALLOCATIONS if a != "auto")


def _parse_targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(check_target(v) for v in text.split(",") if v.strip())
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    if not values:
        raise argparse.ArgumentTypeError("expected R1,R2,... (fractions of the original)")
    return values


def _parse_allocations(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in SWEEP_ALLOCATIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"allocations are {', '.join(SWEEP_ALLOCATIONS)}; "
                                         f"got {text!r}")
    return values


def build_sweep_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnx-fpgm sweep",
        description="Prune IN at several targets with every allocation and tabulate MACs, "
                    "params, latency and fidelity/accuracy; optionally plot them.")
    parser.add_argument("input", metavar="IN", help="input .onnx model")
    parser.add_argument("--targets", type=_parse_targets, default=DEFAULT_TARGETS,
                        metavar="R1,R2,...",
                        help="fractions of the original MACs (default 0.9,0.8,...,0.2)")
    parser.add_argument("--metric", choices=("macs", "params"), default="macs",
                        help="what the targets are fractions of (default macs)")
    parser.add_argument("--allocations", type=_parse_allocations, default=None,
                        metavar="A1,A2",
                        help="uniform,global,sensitivity (default: all; sensitivity only "
                             "with --calibration)")
    parser.add_argument("--calibration", metavar="DATA.npz",
                        help="real inputs: sensitivity allocation, compensation, fidelity")
    parser.add_argument("--eval", metavar="DATA.npz", dest="evaluation",
                        help="held-out data (optional labels) for the fidelity/accuracy columns")
    parser.add_argument("--compensate", choices=("none", "bias", "lstsq", "obs", "sequential"),
                        default="none",
                        help="also measure every point with this compensation")
    parser.add_argument("--recover", choices=RECOVERIES, default="none",
                        help="distill every point after its compensation (needs --calibration)")
    parser.add_argument("--recover-steps", type=int, default=RECOVER_STEPS, metavar="N",
                        help=f"most training steps per point (default {RECOVER_STEPS})")
    parser.add_argument("--recover-time", type=float, default=None, metavar="SECONDS",
                        help="most training seconds per point (default: no limit)")
    parser.add_argument("--input-shape", metavar="NAME=D1,D2,...", action="append", default=[],
                        type=parse_input_shape,
                        help="concrete shape for an input with symbolic dims")
    parser.add_argument("--runs", type=int, default=20, metavar="N",
                        help="latency runs per point, interleaved with the original "
                             "(0: no latency)")
    parser.add_argument("--min-channels", type=int, default=1, metavar="N")
    parser.add_argument("--round-to", type=int, default=None, metavar="N")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the sweep (needs "
                        "matplotlib: pip install 'onnx-fpgm[plot]')")
    parser.add_argument("--json", metavar="FILE.json", help="write the sweep as JSON")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def run_sweep_command(args) -> int:
    inp = Path(args.input)
    if not inp.is_file():
        hint = " (to prune a model file named 'sweep', write ./sweep)" \
            if Path("sweep").is_file() else ""
        raise ModelLoadError(f"{inp}: no such file{hint}")
    plan = FilePlan.of(reads=[("IN", inp), ("--calibration", args.calibration),
                              ("--eval", args.evaluation)],
                       writes=[("--json", args.json), ("--plot", args.plot)])
    plan.check(complete=False)  # IN's data files are known once IN is read
    limit_sessions()
    if args.plot:
        require_matplotlib()  # fail before the work, with the extra's name
    if args.runs < 0:
        raise ConfigError("--runs must be >= 0")
    allocations = args.allocations or tuple(
        a for a in SWEEP_ALLOCATIONS if a != "sensitivity" or args.calibration)
    compensations = ("none",) if args.compensate == "none" else ("none", args.compensate)
    base = PruneConfig(calibration=args.calibration, evaluation=args.evaluation,
                       input_shapes=tuple(args.input_shape), min_channels=args.min_channels,
                       round_to=args.round_to, recover=args.recover,
                       recover_steps=args.recover_steps, recover_time=args.recover_time)
    console = Console(quiet=args.quiet)
    if not console.is_terminal:  # a pipe or file: the whole table, not 80 folded columns
        console = Console(quiet=args.quiet, width=140)
    with ProgressBars(Console(stderr=True, quiet=args.quiet)) as progress:
        loaded = mapped.load_mapped(inp)
        plan.add_reads("IN's data file", loaded.files[1:])
        plan.check()  # IN's data files are known now: none may be overwritten either
        sweep = run_sweep(str(inp), args.targets, allocations, metric=args.metric,
                          compensations=compensations, base=base, latency_runs=args.runs,
                          progress=progress, loaded=loaded)
    render_sweep(sweep, console)
    if args.json:
        write_text(args.json, json.dumps(sweep.to_dict(), indent=2), "--json")
        say(console, f"wrote {args.json}")
    if args.plot:
        plot_sweep(sweep, args.plot)
        say(console, f"wrote {args.plot}")
    return 0

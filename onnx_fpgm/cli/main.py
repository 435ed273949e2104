"""``onnx-fpgm IN OUT``: argparse -> PruneConfig -> prune -> report. Exit codes: 0 done,
1 verification failed, 2 bad input or usage, 3 internal error."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from ..config import (
    ALLOCATIONS,
    COMPENSATIONS,
    CRITERIA,
    RECOVER_STEPS,
    RECOVERIES,
    ImageScaling,
    PruneConfig,
    check_sparsity,
    check_target,
)
from ..errors import ConfigError, OnnxFpgmError
from ..measure.bench import benchmark
from ..model import mapped
from ..model.files import FilePlan, write_text
from ..model.genai_config import GENAI_CONFIG, config_for_out
from ..model.runtime import limit_sessions
from ..outcome.entry import prune
from ..report import printable, render, say
from .common import (
    EXIT_INTERNAL,
    PIPE_WIDTH,
    Parser,
    ProgressBars,
    parse_input_shape,
)
from .sweep import build_sweep_parser, run_sweep_command


def _parse_layer_sparsity(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected REGEX=S, got {text!r}")
    try:
        return pattern, check_sparsity(value, what=f"sparsity for {pattern!r}")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parse_target(text: str) -> float:
    try:
        return check_target(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parse_sparsity(text: str) -> float:
    try:
        return check_sparsity(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}"
                                         ) from err


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnx-fpgm",
        description="Remove whole filters from an ONNX model by FPGM (geometric median), "
                    "rewrite every coupled layer, and verify the result with onnxruntime.",
        epilog="Also: onnx-fpgm sweep IN [...] prunes IN at several targets with every "
               "allocation and tabulates (and plots) the trade-off; see onnx-fpgm sweep --help.")
    parser.add_argument("input", metavar="IN", help="input .onnx model")
    parser.add_argument("output", metavar="OUT", nargs="?", help="output .onnx model")
    parser.add_argument("--sparsity", type=_parse_sparsity, default=None,
                        help="fraction of each group's channels to remove (default 0.5)")
    parser.add_argument("--head-sparsity", type=_parse_sparsity, default=None, metavar="S",
                        help="fraction of attention heads to remove per layer (default: "
                             "--sparsity); at least one head stays. Each kept head also loses "
                             "--sparsity of its head_dim (so at 0.5 attention keeps a quarter "
                             "of its channels) unless --keep-head-dims")
    parser.add_argument("--keep-head-dims", action="store_true",
                        help="keep the head_dim of every kept attention head whole (prune "
                             "whole heads only)")
    parser.add_argument("--allow-interface-change", action="store_true",
                        help="let KV-cache inputs/outputs (past_key_values.*, present.*) "
                             "shrink with their heads, so whole KV groups prune (default: the "
                             "KV heads stay); the changed shapes are printed and reported")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=_parse_target, metavar="R",
                        help="prune to this fraction of the original MACs (per-group "
                             "sparsities chosen by --allocation)")
    target.add_argument("--target-params", type=_parse_target, metavar="R",
                        help="prune to this fraction of the original parameters")
    target.add_argument("--target-latency", type=_parse_target, metavar="R",
                        help="prune to this fraction of the original onnxruntime latency on "
                             "this machine (searched by timing pruned models)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="auto",
                        help="how a target is spread over groups: uniform, global (score per "
                             "MAC saved), sensitivity (measured on --calibration); auto: "
                             "sensitivity with --calibration, else global")
    parser.add_argument("--plan", metavar="REPORT.json",
                        help="re-apply the kept channels of a saved --report (this model or "
                             "another export of it)")
    parser.add_argument("--dist", type=int, choices=(1, 2), default=2,
                        help="distance between filters: 1 (L1) or 2 (L2, default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where FPGM scores are computed (default: CUDA if present)")
    parser.add_argument("--exclude", metavar="REGEX", action="append", default=[],
                        help="leave groups with a producer node name matching REGEX unpruned")
    parser.add_argument("--layer-sparsity", metavar="REGEX=S", action="append", default=[],
                        type=_parse_layer_sparsity,
                        help="sparsity S for groups with a producer matching REGEX")
    parser.add_argument("--min-channels", type=int, default=1, metavar="N",
                        help="channels every group keeps at least (default 1)")
    parser.add_argument("--round-to", type=int, default=None, metavar="N",
                        help="keep a multiple of N channels in every group (e.g. 8)")
    parser.add_argument("--input-shape", metavar="NAME=D1,D2,...", action="append", default=[],
                        type=parse_input_shape,
                        help="concrete shape for an input with symbolic dims")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime check against the masked original")
    parser.add_argument("--benchmark", action="store_true",
                        help="measure onnxruntime latency of both models, interleaved")
    parser.add_argument("--report", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the channel groups and blocked tensors; write no model")
    parser.add_argument("--strict", action="store_true",
                        help="fail when an unsupported op blocks a group")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the verification inputs and of --criterion random")
    parser.add_argument("--criterion", choices=CRITERIA, default="fpgm",
                        help="channel ranking: fpgm (default), l1/l2 filter norm, random, obs "
                             "(least reconstruction error of the consumers; needs --calibration)")
    parser.add_argument("--calibration", metavar="DATA.npz|DIR",
                        help="real inputs (arrays named like the graph inputs, batch first; "
                             "optional 'labels'; or a folder of JPEG/PNG images): "
                             "fidelity/accuracy report, compensation, --recover")
    parser.add_argument("--eval", metavar="DATA.npz|DIR", dest="evaluation",
                        help="held-out data (same format) for the fidelity/accuracy report")
    parser.add_argument("--compensate", choices=COMPENSATIONS, default="none",
                        help="recover removed channels in their consumers: bias, lstsq, obs "
                             "(closed-form OBS update) or sequential (each consumer refitted on "
                             "its compensated input, in one pass; all three need --calibration), "
                             "or auto (best of none/bias/lstsq on the calibration data)")
    parser.add_argument("--recover", choices=RECOVERIES, default="none",
                        help="distill: train the pruned model's weights to reproduce the "
                             "original on --calibration data (after any --compensate)")
    parser.add_argument("--recover-steps", type=_parse_positive_int, default=RECOVER_STEPS,
                        metavar="N", help=f"most training steps of --recover (default "
                                          f"{RECOVER_STEPS}; stops early on held-out data)")
    parser.add_argument("--recover-time", type=_parse_seconds, default=None, metavar="SECONDS",
                        help="most seconds of --recover training (default: no limit)")
    parser.add_argument("--pixel-scale", type=float, default=1 / 255, metavar="S",
                        help="images (--calibration DIR): pixel values 0..255 times S "
                             "(default 1/255)")
    parser.add_argument("--mean", type=_parse_floats, default=(0.0,), metavar="M[,M,M]",
                        help="images: subtracted per channel after --pixel-scale (default 0)")
    parser.add_argument("--std", type=_parse_floats, default=(1.0,), metavar="S[,S,S]",
                        help="images: divided per channel after --mean (default 1)")
    parser.add_argument("--bgr", action="store_true", help="images: channels in BGR order")
    parser.add_argument("--letterbox", action="store_true",
                        help="images: fit inside the input size, padded with grey, instead "
                             "of resizing to it")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, runner = build_parser(), _run
    if argv[:1] == ["sweep"]:  # the subcommand; a model file named sweep is ./sweep
        parser, runner, argv = build_sweep_parser(), run_sweep_command, argv[1:]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): return it, as documented
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.ERROR, format="onnx-fpgm: %(message)s")
    try:
        return runner(args)
    except OnnxFpgmError as err:
        text = str(err) if err.exit_code != EXIT_INTERNAL or str(err).startswith(
            "internal error") else f"internal error: {err}; please report it"
        print(f"onnx-fpgm: error: {printable(text)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("onnx-fpgm: error: interrupted; nothing was written", file=sys.stderr)
        return 2
    except MemoryError:
        print("onnx-fpgm: error: out of memory", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line, never a traceback
        line = str(err).splitlines()[0] if str(err) else ""
        print(f"onnx-fpgm: error: internal error ({type(err).__name__}: {printable(line)}); "
              "please report it",
              file=sys.stderr)
        return EXIT_INTERNAL


def _file_plan(args) -> FilePlan:
    """Every file the run reads and writes, checked before any work (``model.files``)."""
    plan = FilePlan.of(reads=[("IN", args.input), ("--plan", args.plan),
                              ("--calibration", args.calibration), ("--eval", args.evaluation)],
                       writes=[("--report", args.report)])
    if not args.dry_run:
        if not args.output:
            raise ConfigError("OUT is required (or use --dry-run)")
        plan.add_model_output(args.output)
        if args.allow_interface_change:
            args.genai_config = plan.add_genai_config(args.input, args.output)
    plan.check(complete=False)  # IN's data files are known once IN is read
    return plan


def _run(args) -> int:
    plan = _file_plan(args)
    limit_sessions()
    targets = (args.target_macs, args.target_params, args.target_latency)
    if args.sparsity is not None and any(targets):
        raise ConfigError("give --sparsity or a target (--target-macs/--target-params), "
                          "not both")
    if args.plan and (args.sparsity is not None or any(targets)):
        raise ConfigError("--plan fixes every group's channels: drop --sparsity and targets")
    config = PruneConfig(
        sparsity=0.5 if args.sparsity is None else args.sparsity,
        head_sparsity=args.head_sparsity, keep_head_dims=args.keep_head_dims,
        allow_interface_change=args.allow_interface_change,
        target_macs=args.target_macs, target_params=args.target_params,
        target_latency=args.target_latency,
        allocation=args.allocation, plan=args.plan, dist=args.dist, device=args.device,
        exclude=tuple(args.exclude),
        layer_sparsity=tuple(args.layer_sparsity), min_channels=args.min_channels,
        round_to=args.round_to, verify=not args.no_verify and not args.dry_run,
        strict=args.strict, input_shapes=tuple(args.input_shape), seed=args.seed,
        criterion=args.criterion, calibration=args.calibration, compensate=args.compensate,
        evaluation=args.evaluation, recover=args.recover, recover_steps=args.recover_steps,
        recover_time=args.recover_time,
        image_scaling=ImageScaling(args.pixel_scale, args.mean, args.std, args.bgr,
                                   args.letterbox))
    console = Console(quiet=args.quiet)
    if not console.is_terminal:  # a pipe or a file: full node names, never wrapped mid-name
        console = Console(quiet=args.quiet, width=PIPE_WIDTH)
    err_console = Console(stderr=True, quiet=args.quiet)
    with ProgressBars(err_console) as progress:
        loaded = mapped.load_mapped(args.input)
        plan.add_reads("IN's data file", loaded.files[1:])
        plan.check()  # IN's data files are known now: none may be overwritten either
        result = prune(loaded, config=config, progress=progress)
        if args.benchmark and not args.dry_run and result.report.latency is None:
            advance = progress("benchmark", 30)
            # a memory-mapped input's original references its data file: pass the path
            original = args.input if result.external_data else result.original
            result.report.latency = benchmark(original, result.model,
                                              input_shapes=result.input_sizes.primary,
                                              progress=advance)
    genai = getattr(args, "genai_config", None)
    genai_text = None
    if genai is not None:  # refused (ConfigError) before anything is written
        genai_text, note = config_for_out(genai[0].read_text(), result.model,
                                          result.report.interface_changes, Path(args.output).name)
        result.report.notes.append(note)
    # everything that can fail runs before the first write: the JSON, the table
    report_json = result.report.to_json() if args.report else None
    render(result.report, console, dry_run=args.dry_run)
    if not args.dry_run:
        result.save(args.output, genai_config=False)  # written below, its note in the report
    if genai_text is not None:
        write_text(genai[1], genai_text, f"OUT's {GENAI_CONFIG}")
    if report_json is not None:
        write_text(args.report, report_json, "--report")
    if not args.dry_run:
        say(console, f"wrote {args.output}")
    return 0



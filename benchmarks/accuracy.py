"""Top-1 accuracy of the trained MNIST model after pruning, without retraining.

For sparsity 0.1 .. 0.7, every criterion (fpgm, l1, l2, random) and every compensation (none,
bias, lstsq): prune ``models/mnist_resnet.onnx`` (compensation fitted on
``models/mnist_calib.npz``), then measure top-1 accuracy on the held-out
``models/mnist_eval.npz`` and the MACs ratio. Prints one table.

    python benchmarks/accuracy.py [--sparsities 0.1,0.3,0.5,0.7]

``--grid`` instead compares criterion x allocation x recovery at MACs targets (held-out top-1):

    python benchmarks/accuracy.py --grid [--targets 0.5,0.3] [--criteria fpgm,l1,obs]
        [--allocations uniform,global,sensitivity] [--recoveries none,lstsq,obs]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration, run_batched
from onnx_fpgm.model.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
EVAL = ROOT / "models" / "mnist_eval.npz"
CRITERIA = ("fpgm", "l1", "l2", "random")
COMPENSATIONS = ("none", "bias", "lstsq")


def accuracy(model, data) -> float:
    logits = run_batched(make_session(model), model, data)[0]
    return float(np.mean(logits.argmax(1) == data.labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--grid", action="store_true",
                        help="criterion x allocation x recovery at MACs targets")
    parser.add_argument("--targets", default="0.5,0.3")
    parser.add_argument("--criteria", default="fpgm,l1,obs")
    parser.add_argument("--allocations", default="uniform,global,sensitivity")
    parser.add_argument("--recoveries", default="none,lstsq,obs")
    args = parser.parse_args()
    if args.grid:
        grid(args)
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    original, _ = onnx_fpgm.model.io.load_model(MODEL)
    evaluation = load_calibration(EVAL, original)
    base = accuracy(original, evaluation)
    print(f"original top-1 on {evaluation.n_samples} held-out images: {100 * base:.2f}%")
    header = f"{'sparsity':>8} {'MACs x':>7} {'criterion':>9} " + " ".join(
        f"{c:>8}" for c in COMPENSATIONS)
    print(header)
    print("-" * len(header))
    averages = {c: [] for c in CRITERIA}
    started = time.perf_counter()
    for sparsity in sparsities:
        for criterion in CRITERIA:
            cells, macs = [], None
            for mode in COMPENSATIONS:
                result = onnx_fpgm.prune(original, sparsity, criterion=criterion,
                                         compensate=mode, verify=mode == "none",
                                         calibration=str(CALIB) if mode != "none" else None,
                                         input_shapes=(("input", (1, 1, 28, 28)),))
                macs = result.report.before.macs / result.report.after.macs
                top1 = accuracy(result.model, evaluation)
                cells.append(f"{100 * top1:7.2f}%")
                if mode == "none":
                    averages[criterion].append(top1)
            print(f"{sparsity:8.2f} {macs:6.2f}x {criterion:>9} " + " ".join(cells), flush=True)
    print("\nmean top-1 over the sparsities without compensation: " + ", ".join(
        f"{c} {100 * np.mean(v):.2f}%" for c, v in averages.items()))
    print(f"({time.perf_counter() - started:.0f} s)")


def grid(args) -> None:
    """One row per (target, criterion, allocation), one column per recovery."""
    original, _ = onnx_fpgm.model.io.load_model(MODEL)
    evaluation = load_calibration(EVAL, original)
    print(f"original top-1 on {evaluation.n_samples} held-out images: "
          f"{100 * accuracy(original, evaluation):.2f}%")
    recoveries = args.recoveries.split(",")
    header = f"{'target':>6} {'criterion':>9} {'allocation':>11} " + " ".join(
        f"{r:>8}" for r in recoveries) + "  seconds"
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    for target in [float(t) for t in args.targets.split(",")]:
        for criterion in args.criteria.split(","):
            for allocation in args.allocations.split(","):
                cells, row_started = [], time.perf_counter()
                cache: dict = {}  # sensitivities measured once per row and recovery
                for mode in recoveries:
                    result = onnx_fpgm.prune(original, criterion=criterion, target_macs=target,
                                             allocation=allocation, compensate=mode,
                                             calibration=str(CALIB), verify=False,
                                             input_shapes=(("input", (1, 1, 28, 28)),),
                                             cache=cache)
                    cells.append(f"{100 * accuracy(result.model, evaluation):7.2f}%")
                print(f"{target:6.2f} {criterion:>9} {allocation:>11} " + " ".join(cells)
                      + f"  {time.perf_counter() - row_started:7.0f}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

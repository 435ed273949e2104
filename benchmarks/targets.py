"""Pruning the trained MNIST model to a MACs target: uniform vs global vs sensitivity allocation.

For each target (default 0.5, 0.3, 0.2 of the original MACs), each allocation and each
compensation (none, lstsq): prune ``models/mnist_resnet.onnx`` (sensitivity and lstsq use
``models/mnist_calib.npz``), then measure top-1 accuracy on the held-out
``models/mnist_eval.npz``. Prints one table (achieved MACs fraction, held-out accuracy, and
the per-group sparsities) and the machine.

    python benchmarks/targets.py [--targets 0.5,0.3,0.2] [--plot docs/mnist_sweep.png]

``--plot`` also runs ``onnx-fpgm sweep`` on the model (targets 0.9 .. 0.2, all allocations,
with lstsq) and writes its PNG.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration, run_batched
from onnx_fpgm.model.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
EVAL = ROOT / "models" / "mnist_eval.npz"
ALLOCATIONS = ("uniform", "global", "sensitivity")
COMPENSATIONS = ("none", "lstsq")


def accuracy(model, data) -> float:
    logits = run_batched(make_session(model), model, data)[0]
    return float(np.mean(logits.argmax(1) == data.labels))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, torch "
            f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, GPU: "
            f"{'yes' if torch.cuda.is_available() else 'none'}, load avg "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.3,0.2")
    parser.add_argument("--plot", help="also write the sweep PNG here")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    print(machine())
    original, _ = onnx_fpgm.model.io.load_model(MODEL)
    evaluation = load_calibration(EVAL, original)
    print(f"original top-1 on {evaluation.n_samples} held-out images: "
          f"{100 * accuracy(original, evaluation):.2f}%")
    header = (f"{'target':>6} {'allocation':>11} {'MACs':>6} {'acc none':>9} {'acc lstsq':>9}"
              "  per-group sparsity")
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    caches: dict[str, dict] = {}
    for target in targets:
        for allocation in ALLOCATIONS:
            cells, macs, groups = [], None, ""
            for mode in COMPENSATIONS:
                result = onnx_fpgm.prune(original, target_macs=target, allocation=allocation,
                                         compensate=mode, calibration=str(CALIB),
                                         cache=caches.setdefault(allocation, {}))
                macs = result.report.after.macs / result.report.before.macs
                cells.append(f"{100 * accuracy(result.model, evaluation):8.2f}%")
                groups = " ".join(f"{g.sparsity:.2f}" for g in result.plan.groups
                                  if not g.frozen)
            print(f"{target:6.2f} {allocation:>11} {macs:6.3f} {cells[0]} {cells[1]}  {groups}",
                  flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.plot:
        from onnx_fpgm.cli import main as cli

        cli.main(["sweep", str(MODEL), "--calibration", str(CALIB), "--eval", str(EVAL),
                  "--compensate", "lstsq", "--targets", "0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2",
                  "--plot", args.plot, "--runs", "30"])


if __name__ == "__main__":
    main()

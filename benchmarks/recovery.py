"""Plain rewrite vs lstsq compensation vs distillation (--recover distill) on the shipped MNIST
model: held-out accuracy (models/mnist_eval.npz) and the time of each recovery, side by side.

    python benchmarks/recovery.py [--targets 0.3,0.5] [--steps 150]

Prunes to each MACs target with uniform allocation (fast; the sensitivity allocation's own
cost is not what is compared), then distils from the plain rewrite and from lstsq.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import onnx_fpgm

MODELS = Path(__file__).resolve().parents[1] / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.3,0.5")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    common = {"calibration": str(MODELS / "mnist_calib.npz"),
              "evaluation": str(MODELS / "mnist_eval.npz"), "allocation": "uniform"}
    model = str(MODELS / "mnist_resnet.onnx")
    print(f"{'MACs':>5} {'method':<16} {'accuracy':>8} {'rel.err':>8} {'time s':>7}  steps")
    for target in (float(t) for t in args.targets.split(",")):
        runs = [("plain", {}), ("lstsq", {"compensate": "lstsq"}),
                ("distill", {"recover": "distill", "recover_steps": args.steps}),
                ("lstsq+distill", {"compensate": "lstsq", "recover": "distill",
                                   "recover_steps": args.steps})]
        for name, options in runs:
            started = time.perf_counter()
            result = onnx_fpgm.prune(model, target_macs=target, **common, **options)
            elapsed = time.perf_counter() - started
            part = result.report.fidelity_data[0]
            recovery = result.report.recovery
            spent = result.report.timings_s.get("compensate", 0.0)
            steps = f"{recovery.steps} ({recovery.stopped})" if recovery else "-"
            print(f"{target:>5} {name:<16} {100 * part['accuracy_pruned']:>7.1f}% "
                  f"{part['relative_error']:>8.3f} {spent:>7.1f}  {steps}   "
                  f"(whole run {elapsed:.0f} s; original "
                  f"{100 * part['accuracy_original']:.1f}%)", flush=True)


if __name__ == "__main__":
    main()

"""Sensitivity measurement: the exact path against the fast one, side by side, in one run.

Exact: every level of every group on up to 256 samples; with ``--compensate lstsq`` each probe
is a real rewrite + lstsq refit (the path that took 26 minutes on YOLOv8n). Fast (the default
now): 16 samples per probe on the part of the model downstream of the group, early stop
past a harmful loss (and before the lower levels of a cheap group), and compensated probes as
the closed-form OBS update fed as weights. The exact path can be limited to the first
``--exact-units`` groups: its time is then extrapolated per group (printed as such). Prints the
time of both, the ratio, and whether they agree on the most/least sensitive group.

    python benchmarks/sensitivity_speed.py MODEL.onnx [--calibration X.npz | --images 54]
        [--compensate none|lstsq] [--exact-units 4]

A model: ``python models/make_mobilenetv2.py /tmp/mbv2.onnx`` (3.5 M params, 224x224).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx

import onnx_fpgm
from onnx_fpgm.api import _scorer
from onnx_fpgm.config import PruneConfig
from onnx_fpgm.measure.calibration import Calibration, load_calibration
from onnx_fpgm.model import io
from onnx_fpgm.planning.allocate import SENSITIVITY_LEVELS
from onnx_fpgm.planning.plan import n_to_keep
from onnx_fpgm.planning.sensitivity import measure_compensated_sensitivity, measure_sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration")
    parser.add_argument("--images", type=int, default=54, help="synthetic inputs otherwise")
    parser.add_argument("--compensate", choices=("none", "lstsq"), default="none")
    parser.add_argument("--exact-units", type=int, default=None,
                        help="measure the exact path on this many groups and extrapolate "
                             "(0: the fast path alone)")
    args = parser.parse_args()
    model = onnx.load(args.model)
    if args.calibration:
        calibration = load_calibration(args.calibration, model)
    else:
        value = model.graph.input[0]
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim][1:]
        data = np.random.default_rng(0).random((args.images, *shape), np.float32)
        calibration = Calibration({value.name: data})
    analysis = onnx_fpgm.prune(model, 0.0, verify=False).analysis
    units = [[g] for g in analysis.groups if not g.frozen]
    select = _scorer(PruneConfig(), model, analysis)

    def counts(unit, level):
        return [n_to_keep(g.n_channels, level, 1, None) for g in unit]

    n_exact = len(units) if args.exact_units is None else min(args.exact_units, len(units))
    print(f"{args.model}: {len(units)} groups x {len(SENSITIVITY_LEVELS)} levels, "
          f"{calibration.n_samples} samples, compensate {args.compensate}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    if not n_exact:
        exact = None
    elif args.compensate == "none":
        exact = measure_sensitivity(model, analysis, units[:n_exact], SENSITIVITY_LEVELS,
                                    select, calibration, counts, samples=None, harmful=None,
                                    cheap=None)
    else:
        exact = measure_compensated_sensitivity(
            model, io.infer_shapes(io.light_copy(model)), io.default_opset(model), analysis,
            units[:n_exact], SENSITIVITY_LEVELS, select, calibration, counts, args.compensate)
    t_exact = (time.perf_counter() - started) * len(units) / max(n_exact, 1)
    started, cpu = time.perf_counter(), time.process_time()
    fast = measure_sensitivity(model, analysis, units, SENSITIVITY_LEVELS, select, calibration,
                               counts, update=args.compensate != "none")
    t_fast, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"fast: {t_fast:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.1f}")
    if exact is None:
        return
    how = "measured" if n_exact == len(units) else f"extrapolated from {n_exact} groups"
    print(f"{'path':>6} {'seconds':>9}\n{'exact':>6} {t_exact:9.1f}  ({how})\n"
          f"{'fast':>6} {t_fast:9.1f}\nspeed-up {t_exact / t_fast:.1f}x")
    a, b = np.maximum.accumulate(exact, 1)[:, 1], np.maximum.accumulate(fast, 1)[:n_exact, 1]
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    corr = np.corrcoef(*ranks)[0, 1] if n_exact > 2 else float("nan")
    print(f"on the {n_exact} groups both measured, at sparsity {SENSITIVITY_LEVELS[1]}: most "
          f"sensitive {'same' if a.argmax() == b.argmax() else 'differs'}, least "
          f"{'same' if a.argmin() == b.argmin() else 'differs'}, rank correlation {corr:.2f}")


if __name__ == "__main__":
    main()

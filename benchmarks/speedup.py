"""Measured latency speedup of pruned models against their MACs reduction.

Usage: ``python benchmarks/speedup.py [--runs 20] [--warmup 3] [--models resnet50 mobilenetv2]``

For each model (generated into ``models/*_generated.onnx`` when missing), sparsity 0.3 and
0.5, with and without ``round_to=8``: ``onnx_fpgm.prune`` (verification on only for
sparsity 0.5 without rounding, once per model; off elsewhere for speed), then
``onnx_fpgm.measure.bench.benchmark(original, pruned, runs, warmup)``: both onnxruntime sessions in
one process, interleaved run by run, thread spinning off (CPU provider here; CUDA with I/O
binding where a GPU is present). Ratios are before/after; ``efficiency`` is
``speedup / MACs ratio`` (1.0: latency falls exactly as fast as MACs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import MODELS, ensure_model, format_table  # noqa: E402

SPARSITIES = (0.3, 0.5)
ROUND_TOS = (None, 8)


def bench_config(original, label: str, sparsity: float, round_to: int | None, runs: int,
                 warmup: int) -> dict[str, object]:
    import onnx_fpgm
    from onnx_fpgm.measure.bench import benchmark

    verify = sparsity == 0.5 and round_to is None
    row: dict[str, object] = {"model": label, "sparsity": sparsity,
                              "round_to": round_to if round_to else "-"}
    try:
        t0 = time.perf_counter()
        result = onnx_fpgm.prune(original, sparsity, round_to=round_to, verify=verify)
        prune_s = time.perf_counter() - t0
        before, after = result.report.before, result.report.after
        lat = benchmark(original, result.model, runs=runs, warmup=warmup)
    except Exception as err:  # report library errors instead of hiding the other rows
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    macs_ratio = before.macs / after.macs
    row.update({
        "params ratio": before.params / after.params,
        "MACs ratio": macs_ratio,
        "orig ms": lat.original_ms,
        "orig IQR": lat.original_iqr_ms,
        "pruned ms": lat.pruned_ms,
        "pruned IQR": lat.pruned_iqr_ms,
        "speedup": lat.speedup,
        "efficiency": lat.speedup / macs_ratio,
        "verified": ("passed" if result.report.verification["passed"] else "FAILED")
        if verify else "-",
        "prune s": prune_s,
        "provider": lat.provider.replace("ExecutionProvider", ""),
    })
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["resnet50", "mobilenetv2"])
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort

    started = time.perf_counter()
    print(f"latency speedup vs MACs reduction; onnxruntime {ort.__version__}, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}, runs {args.runs}, "
          f"warmup {args.warmup} (medians, ms)", flush=True)
    rows = []
    for key in args.models:
        label = MODELS[key][0]
        original = onnx.load(str(ensure_model(key)))
        for sparsity in SPARSITIES:
            for round_to in ROUND_TOS:
                row = bench_config(original, label, sparsity, round_to, args.runs, args.warmup)
                print(f"  done {label} s={sparsity} round_to={round_to}", flush=True)
                rows.append(row)
    print()
    print(format_table(rows))
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; wall {time.perf_counter() - started:.1f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

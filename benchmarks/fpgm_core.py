"""Benchmark the FPGM core against the seed implementation and a one-GEMM floor.

Usage: ``python benchmarks/fpgm_core.py [--repeats 15] [--device all|cpu|cuda] [--threads N]
[--large] [--out FILE]``

For each shape, on CPU (and CUDA when available), times with the median of ``--repeats``
rounds after a warm-up:

- seed:  PyTorch ``FPGMPruner`` style: per-row flatten loop, ``torch.stack``, ``torch.cdist``,
         ``abs().sum(1)``, ``topk`` (written here, not imported);
- ours:  ``onnx_fpgm.importance.fpgm.fpgm_select`` (scores + exact selection);
- floor: one float32 ``X @ X.T`` on the same ``(N, D)``.

The three run round-robin inside each round, so a noisy neighbour slows all of them alike;
the ratios are medians of per-round ratios. ``same sel.`` compares ours with the seed at
sparsity 0.5; ``exact`` compares ours with a float64 ``torch.cdist`` reference.
``torch.set_num_threads`` is left at its default unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from onnx_fpgm.importance.fpgm import fpgm_select, n_to_prune
sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import format_table  # noqa: E402  (one table format for every benchmark)

SHAPES: list[tuple[int, ...]] = [
    (64, 64, 3, 3),
    (256, 64, 1, 1),
    (512, 512, 3, 3),
    (2048, 512, 1, 1),
    (3072, 768),
]
#: ``--large``: issue 12's big producers (VGG's 4096 x 25088 classifier; the 2.83 GB stack's
#: 512 x 4608 convs are ``(512, 512, 3, 3)`` above). The seed runs there too (one cdist).
LARGE_SHAPES: list[tuple[int, ...]] = [(4096, 25088)]
SPARSITY = 0.5


def seed_select(weight: torch.Tensor, sparsity: float) -> np.ndarray:
    """The seed's algorithm: per-row flatten + stack + cdist + abs-sum + topk(smallest)."""
    rows = [weight[i : i + 1].reshape(-1) for i in range(weight.shape[0])]
    flat = torch.stack(rows)
    distance = torch.sum(torch.abs(torch.cdist(flat, flat, p=2)), 1)
    k = round(sparsity * weight.shape[0])
    idx = torch.topk(distance, k=k, largest=False).indices
    return np.sort(idx.cpu().numpy())


def exact_select(weight: torch.Tensor, sparsity: float) -> np.ndarray:
    """float64 cdist reference with the same count and tie rule as ours."""
    x = weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)
    scores = torch.cdist(x, x).sum(1).numpy()
    k = n_to_prune(x.shape[0], sparsity)
    return np.sort(np.lexsort((np.arange(x.shape[0]), scores))[:k])


def _timer(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def bench_shape(shape: tuple[int, ...], device: torch.device, repeats: int) -> dict[str, object]:
    """Time seed / ours / floor round-robin on one shape; one table row."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(device)
    x = weight.reshape(shape[0], -1)
    dev_name = "cuda" if device.type == "cuda" else "cpu"
    fns = {
        "seed": _timer(lambda: seed_select(weight, SPARSITY), device),
        "ours": _timer(lambda: fpgm_select(weight, SPARSITY, device=dev_name), device),
        "floor": _timer(lambda: x @ x.T, device),
    }
    for run in fns.values():  # warm-up: allocator, BLAS threads, CUDA context/kernels
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, run in fns.items():
            times[name].append(run())
    ours_sel = fpgm_select(weight, SPARSITY, device=dev_name)
    ratio = {
        "seed/ours": statistics.median(
            s / o for s, o in zip(times["seed"], times["ours"], strict=True)
        ),
        "ours/floor": statistics.median(
            o / f for o, f in zip(times["ours"], times["floor"], strict=True)
        ),
    }
    return {
        "shape": "x".join(map(str, shape)),
        "N,D": f"{x.shape[0]},{x.shape[1]}",
        **{f"{name} ms": statistics.median(t) * 1e3 for name, t in times.items()},
        **ratio,
        "same sel.": "yes" if np.array_equal(ours_sel, seed_select(weight, SPARSITY)) else "no",
        "exact": "yes" if np.array_equal(ours_sel, exact_select(weight, SPARSITY)) else "no",
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on the requested devices; print (and optionally save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--large", action="store_true",
                        help="also the 4096 x 25088 classifier of VGG (about 5 s a GEMM on 2 cores)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads for all three (default: torch's own); 1 gives stable "
        "ratios on a machine shared with other jobs, where every multi-threaded op of a "
        "multi-op method can wait a scheduler slice for its second thread",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        print("no CUDA device available", file=sys.stderr)
        return 2

    report: list[str] = []

    def emit(*lines: str) -> None:
        report.extend(lines)
        print("\n".join(lines), flush=True)

    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    emit(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {cpus}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '<unset>')}, load avg {load:.2f}, "
        f"repeats {args.repeats}, sparsity {SPARSITY}"
    )
    if load > 0.75 * cpus and torch.get_num_threads() > 1:
        emit(
            "warning: the machine is busy; with spinning OpenMP threads every multi-threaded op "
            "may wait for a descheduled sibling, which penalises multi-op methods. Rerun with "
            "OMP_WAIT_POLICY=PASSIVE or --threads 1 for stable ratios."
        )
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        shapes = SHAPES + (LARGE_SHAPES if args.large else [])
        rows = [bench_shape(shape, device, args.repeats) for shape in shapes]
        emit("", f"device: {device.type} ({name})", format_table(rows))
    emit(f"load avg after: {os.getloadavg()[0]:.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

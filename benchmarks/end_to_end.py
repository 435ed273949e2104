"""End-to-end cost of one prune, phase by phase, against an I/O + one-inference floor.

Usage: ``python benchmarks/end_to_end.py [--rounds 3] [--sparsity 0.5] [--models resnet50 densenet121]``

For each model (generated into ``models/*_generated.onnx`` when missing) and each round, two
fresh child processes run, in alternating order so a noisy neighbour hits both alike:

- prune: import the stack (numpy, onnx, onnxruntime, torch, onnx_fpgm), then
  ``onnx_fpgm.prune(path, sparsity, verify=True)`` and ``PruneResult.save`` to a temporary
  file; the phase times are ``report.timings_s`` (load, analyse, score, rewrite, measure,
  verify, save); ``other`` is wall time not inside a phase (building the report, ...);
- floor: import the same third-party stack, ``onnx.load`` the model, build one onnxruntime CPU
  session (default optimisations, thread spinning off as onnx_fpgm does) and run it once on a
  random input (symbolic dims: batch 1, others ``FLOOR_SYMBOLIC_SIZE``, what prune chooses
  first for an image), ``onnx.save`` to a temporary file.

``paddle_det`` is the PaddlePaddle detector form (``models/make_paddle_det.py``: Constant
weights, dynamic dims, Resize FPN neck): ``sizes`` is the time spent choosing input sizes by
running the original, ``analyse/1k nodes`` the analysis time per 1,000 graph nodes.

``vgg11bn``, ``vitb16``, ``stack566`` and (``--big``) ``big`` are the issue-12 memory models from
``models/make_big.py`` and ``models/make_vit_b16.py`` (random weights; the stacks store external
data, which the floor hands onnxruntime as a path and saves as external data). ``RSS/weights`` is the peak RSS over the
model's weight bytes (issue 12's budget: 2.5x above 1 GB).

``total`` is the wall time inside the child from the first import to the end of the save
(interpreter start-up excluded in both). ``peak RSS`` is the child's ``ru_maxrss``. Columns
are medians over rounds; ``total/floor`` is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "resnet50": ("ResNet-50 224", ROOT / "models" / "resnet50_generated.onnx",
                 ROOT / "models" / "make_resnet50.py"),
    "densenet121": ("DenseNet-121 224", ROOT / "models" / "densenet121_generated.onnx",
                    ROOT / "models" / "make_densenet121.py"),
    "mobilenetv2": ("MobileNetV2 224", ROOT / "models" / "mobilenetv2_generated.onnx",
                    ROOT / "models" / "make_mobilenetv2.py"),
    "paddle_det": ("Paddle det (dynamic)", ROOT / "models" / "paddle_det_generated.onnx",
                   ROOT / "models" / "make_paddle_det.py"),
    "vgg11bn": ("VGG-11-BN 224 (531 MB)", ROOT / "models" / "vgg11bn_generated.onnx",
                ROOT / "models" / "make_big.py", "vgg11bn"),
    "vitb16": ("ViT-B/16 224 (346 MB)", ROOT / "models" / "vit_b16_generated.onnx",
               ROOT / "models" / "make_vit_b16.py"),
    "stack566": ("conv stack 566 MB (ext.)", ROOT / "models" / "stack566_generated.onnx",
                 ROOT / "models" / "make_big.py", "stack", "--stages", "4"),
    # --big: 302 convs of 512 x 4608, 707 M params, 2.83 GB of external data
    "big": ("conv stack 2.83 GB (ext.)", ROOT / "models" / "stack_big_generated.onnx",
            ROOT / "models" / "make_big.py", "stack"),
}
PHASES = ("load", "sizes", "analyse", "score", "rewrite", "measure", "verify", "save")
#: The floor's size for a symbolic dim other than the batch: what ``prune`` chooses first for
#: an image input (``onnx_fpgm.oracle.input_sizes.SPATIAL[0]``).
FLOOR_SYMBOLIC_SIZE = 64


def ensure_model(key: str) -> Path:
    """Path of the generated model, running its generator first when the file is missing."""
    _, path, script, *args = MODELS[key]
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        command = [sys.executable, str(script), str(path)]
        if args:  # make_big.py: architecture first
            command = [sys.executable, str(script), args[0], str(path), *args[1:]]
        subprocess.run(command, check=True)
    return path


def format_table(rows: list[dict[str, object]]) -> str:
    cols = list(rows[0])
    for row in rows[1:]:
        cols += [c for c in row if c not in cols]

    def cell(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- child processes


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_prune(path: Path, sparsity: float, tmpdir: str) -> dict[str, object]:
    start = time.perf_counter()
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import onnx_fpgm

    t_import = time.perf_counter() - start
    result = onnx_fpgm.prune(path, sparsity, verify=True)
    saved_path = os.path.join(tmpdir, "pruned.onnx")
    result.save(saved_path)
    total = time.perf_counter() - start
    rss = _peak_rss_mib()  # before the check below, which is not part of the job
    timings = dict(result.report.timings_s)
    verification = result.report.verification or {}
    return {
        "import": t_import, **{p: timings.get(p) for p in PHASES}, "total": total,
        "other": total - t_import - sum(v for v in timings.values()),
        "rss": rss, "weight_bytes": result.report.before.bytes,
        "verified": "passed" if verification.get("passed") else "FAILED",
        "saved": _saved_matches(result, saved_path),
        "sizes_at": " & ".join(verification.get("checked_at") or []) or "static",
        "params": [result.report.before.params, result.report.after.params],
        "macs": [result.report.before.macs, result.report.after.macs],
    }


def _saved_matches(result, saved_path: str) -> str:
    """The written file, run by onnxruntime from its path (with its external data, if any),
    gives exactly the outputs of the pruned model that passed the oracle in memory."""
    import numpy as np
    import onnxruntime as ort

    from onnx_fpgm.model.runtime import random_inputs

    sizes = getattr(result.report, "input_sizes", None) or {}  # older versions: static sizes
    shapes = {name: tuple(dims) for name, dims in (sizes.get("primary") or {}).items()}
    feeds = random_inputs(result.model, seed=3, shapes=shapes)
    cpu = ["CPUExecutionProvider"]  # same default options for both, so the same kernels
    in_memory = ort.InferenceSession(result.model.SerializeToString(), providers=cpu).run(
        None, feeds)
    from_file = ort.InferenceSession(saved_path, providers=cpu).run(None, feeds)
    same = all(np.array_equal(a, b) for a, b in zip(in_memory, from_file, strict=True))
    external = os.path.exists(saved_path + ".data")
    return ("identical" if same else "DIFFERS") + (" (ext. data)" if external else "")


def child_floor(path: Path, tmpdir: str) -> dict[str, object]:
    start = time.perf_counter()
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch  # noqa: F401

    t_import = time.perf_counter() - start
    t0 = time.perf_counter()
    model = onnx.load(str(path))
    t_load = time.perf_counter() - t0
    external = any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # external data: onnxruntime reads the files itself (bytes cannot exceed 2 GiB)
    session = ort.InferenceSession(str(path) if external else model.SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 if k == 0 else FLOOR_SYMBOLIC_SIZE
                 for k, d in enumerate(inp.shape)]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    session.run(None, feeds)
    t_ort = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx.save(model, os.path.join(tmpdir, "floor.onnx"), save_as_external_data=external,
              location="floor.onnx.data")
    t_save = time.perf_counter() - t0
    total = time.perf_counter() - start
    return {"import": t_import, "load": t_load, "ort 1 run": t_ort, "save": t_save,
            "total": total, "rss": _peak_rss_mib()}


def run_child(kind: str, path: Path, sparsity: float) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", kind, "--model-path", str(path),
           "--sparsity", str(sparsity)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (rc {proc.returncode}) on {path.name}:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent


def model_stats(path: Path) -> tuple[int, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = model.graph.node
    return len(nodes), sum(n.op_type == "Conv" for n in nodes)


def bench_model(key: str, rounds: int, sparsity: float) -> tuple[list[dict], dict]:
    label = MODELS[key][0]
    path = ensure_model(key)
    n_nodes, n_conv = model_stats(path)
    prunes: list[dict] = []
    floors: list[dict] = []
    for i in range(rounds):
        order = ("floor", "prune") if i % 2 == 0 else ("prune", "floor")
        for kind in order:
            out = run_child(kind, path, sparsity)
            (floors if kind == "floor" else prunes).append(out)
    ratios = [p["total"] / f["total"] for p, f in zip(prunes, floors)]
    weight_bytes = prunes[0]["weight_bytes"]

    def med(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    prune_row = {"model": label, "run": "prune", "nodes": n_nodes, "convs": n_conv,
                 **{k: med(prunes, k) for k in ("import", *PHASES[:-1])}, "ort 1 run": None,
                 **{k: med(prunes, k) for k in ("save", "other", "total")},
                 "peak RSS MiB": round(med(prunes, "rss") or 0.0),
                 "RSS/weights": (med(prunes, "rss") or 0.0) * 2**20 / weight_bytes,
                 "analyse/1k nodes": (med(prunes, "analyse") or 0.0) * 1000 / n_nodes,
                 "total/floor": statistics.median(ratios)}
    floor_row = {"model": label, "run": "floor", "nodes": n_nodes, "convs": n_conv,
                 "import": med(floors, "import"), "load": med(floors, "load"),
                 **dict.fromkeys(PHASES[1:-1]), "ort 1 run": med(floors, "ort 1 run"),
                 "save": med(floors, "save"), "other": None, "total": med(floors, "total"),
                 "peak RSS MiB": round(med(floors, "rss") or 0.0),
                 "RSS/weights": (med(floors, "rss") or 0.0) * 2**20 / weight_bytes,
                 "total/floor": 1.0}
    p = prunes[0]
    extra = {
        "model": label, "verified": ",".join(sorted({r["verified"] for r in prunes})),
        "saved file": ",".join(sorted({r["saved"] for r in prunes})),
        "params": f"{p['params'][0]:,} -> {p['params'][1]:,}",
        "MACs": f"{p['macs'][0]:,} -> {p['macs'][1]:,}",
        "verified at": p["sizes_at"],
        "total/floor per round": " ".join(f"{r:.2f}" for r in ratios),
    }
    return [prune_row, floor_row], extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["resnet50", "densenet121", "paddle_det"])
    parser.add_argument("--big", action="store_true",
                        help="add the 2.83 GB external-data conv stack (generated, ~3 GB disk)")
    parser.add_argument("--child", choices=["prune", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="e2e-") as tmpdir:
            if args.child == "prune":
                out = child_prune(args.model_path, args.sparsity, tmpdir)
            else:
                out = child_floor(args.model_path, tmpdir)
        print(json.dumps(out))
        return 0

    started = time.perf_counter()
    print(f"end-to-end prune (sparsity {args.sparsity}, verify on) vs floor; "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}, rounds {args.rounds} "
          f"(medians; times in s)", flush=True)
    rows: list[dict] = []
    extras: list[dict] = []
    for key in [*args.models, *(["big"] if args.big and "big" not in args.models else [])]:
        model_rows, extra = bench_model(key, args.rounds, args.sparsity)
        rows += model_rows
        extras.append(extra)
    print()
    print(format_table(rows))
    print()
    print(format_table(extras))
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; wall {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

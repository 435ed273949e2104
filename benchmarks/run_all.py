"""Run the three benchmarks in sequence and print (and save) their tables.

Usage: ``python benchmarks/run_all.py [--budget 570] [--out benchmarks/out/run_all.txt]``

Runs ``fpgm_core.py``, ``end_to_end.py`` and ``speedup.py`` one after another as
subprocesses (each with this interpreter), streaming their output, under one wall-clock budget
(a script still running when the budget is spent is killed and reported). The machine header
(CPU, versions, load) and every script's output go to ``--out`` as well.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS: list[list[str]] = [
    ["fpgm_core.py"],
    ["end_to_end.py"],
    ["speedup.py"],
]


def machine_header() -> str:
    lines = [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per",
                "Socket(s)", "L2 cache", "L3 cache", "Flags")
        lines += [ln for ln in lscpu.splitlines() if ln.startswith(keep) and "Flags" not in ln]
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = [f"Python {platform.python_version()}"]
    for mod in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception as err:  # a missing module is reported, not fatal
            versions.append(f"{mod} unavailable ({type(err).__name__})")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        gpu = "unknown"
    lines.append(", ".join(versions) + f"; GPU: {gpu}")
    lines.append(f"cpus {os.cpu_count()}, load avg (1/5/15 min) "
                 + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    try:  # what else was using the CPU when the run started (a shared machine is noisy)
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
        busy = [ln[:120] for ln in ps[1:] if float(ln.split()[1]) >= 10.0
                and str(os.getpid()) != ln.split()[0]]
        lines.append("other busy processes at start: " + ("; ".join(busy) if busy else "none"))
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        pass
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=570.0,
                        help="seconds for all three scripts together (default 570)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "run_all.txt")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    log: list[str] = []

    def emit(text: str) -> None:
        log.append(text)
        print(text, flush=True)

    emit(machine_header())
    status = 0
    for script in SCRIPTS:
        left = args.budget - (time.perf_counter() - started)
        cmd = [sys.executable, str(HERE / script[0]), *script[1:]]
        emit(f"\n===== {' '.join(script)} =====")
        if left <= 0:
            emit("skipped: time budget spent")
            status = 1
            continue
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        assert proc.stdout is not None
        stream = proc.stdout
        reader = threading.Thread(target=lambda: [emit(ln.rstrip("\n")) for ln in stream],
                                  daemon=True)
        reader.start()
        killed = False
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:  # kill the script and the children it started
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            killed = True
        reader.join(timeout=5)
        elapsed = time.perf_counter() - t0
        if killed:
            emit(f"killed: over the time budget after {elapsed:.1f} s")
            status = 1
        else:
            emit(f"[{script[0]}: exit {rc}, {elapsed:.1f} s]")
            status = status or (rc != 0)
    total = time.perf_counter() - started
    emit(f"\nrun_all: {total:.1f} s in all (budget {args.budget:.0f} s); "
         f"load avg after {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(log) + "\n")
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())

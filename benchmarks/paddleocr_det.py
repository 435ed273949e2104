"""Real-model study: PaddleOCR's PP-OCRv4 text detector (as shipped in rapidocr-onnxruntime
1.4.4) pruned to MACs targets, on real text images that ship inside scikit-image.

Nothing is downloaded at run time by the tool: this script fetches the two wheels with
``pip download --no-deps`` into a cache directory (kept out of the repo) and reads the model
and ``skimage/data/page.png`` / ``text.png`` out of them (the only text photos in them).
Calibration crops come from page.png, evaluation on the whole text.png (disjoint images), grey
replicated to RGB, normalised and scaled as RapidOCR does. ``--split 0.5``: only text.png's right
half is evaluated; with ``--crop`` its left half is cropped into the calibration set as well
(handwriting, at the evaluation's scale too). Task metric: IoU of the binarised text maps
(probability > 0.3, DBNet's threshold) of the pruned model against the original's, over the
evaluation images, besides the cosine of the probability map.

    python benchmarks/paddleocr_det.py [--targets 0.8,0.6,0.4]
        [--runs sensitivity/obs/sequential/none,...] [--size 224] [--split 0.5 [--crop]]
        [--exclude REGEX] [--exclude-costliest 1] [--no-refit-downstream] [--damping 0.01]
        [--groups] [--latency] [--cache /tmp/onnx-fpgm-cache]

A run is ``allocation/criterion/compensate/recover`` (``prune_runs.py``, as in ``detector.py``);
runs with the same allocation and criterion share measured sensitivities. ``--groups`` prints the
units that cost each sensitivity plan most (their measured loss read at the sparsity the plan
gave them); ``--exclude-costliest N`` repeats the first sensitivity run with its N costliest
units left whole (the target is then met by cutting the others more). Each process writes its
calibration and evaluation files to a temporary folder of its own, so studies run side by side.
"""
from __future__ import annotations

import argparse
import io as _io
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration, run_batched
from onnx_fpgm.model.runtime import make_session
from onnx_fpgm.recover import sequential
from prune_runs import parse_runs, recovery_note

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
SKIMAGE = "scikit-image==0.26.0"
DET = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
SIZE = 224
#: RapidOCR's preprocessing (config.yaml): x / 255, mean 0.5, std 0.5; images are upscaled so
#: that the short side reaches 736 pixels, at which scale text is what the detector was made for.
MEAN, STD = 0.5, 0.5
SCALES = (736 / 191, 2.9, 2.2)
#: The allocations with FPGM and nothing to recover (what this study measured first).
DEFAULT_RUNS = "uniform/fpgm/none/none,global/fpgm/none/none,sensitivity/fpgm/none/none"


def cached_wheels(cache: Path, specs) -> dict[str, Path]:
    """Wheel by distribution name (``scikit_image``) of every ``specs`` entry
    (``scikit-image==0.26.0``), fetched into ``cache`` with ``pip download --no-deps`` once."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = {w.name.split("-")[0]: w for w in cache.glob("*.whl")}
    missing = [s for s in specs if s.split("==")[0].replace("-", "_") not in wheels]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(cache), *missing], check=True)
        wheels = {w.name.split("-")[0]: w for w in cache.glob("*.whl")}
    return wheels


def fetch(cache: Path) -> tuple[Path, dict[str, np.ndarray]]:
    wheels = cached_wheels(cache, (RAPIDOCR, SKIMAGE))
    model = cache / "ch_PP-OCRv4_det_infer.onnx"
    if not model.exists():
        with zipfile.ZipFile(wheels["rapidocr_onnxruntime"]) as z:
            model.write_bytes(z.read(DET))
    images = {}
    with zipfile.ZipFile(wheels["scikit_image"]) as z:
        for name in ("page", "text"):
            grey = Image.open(_io.BytesIO(z.read(f"skimage/data/{name}.png"))).convert("L")
            images[name] = np.asarray(grey, np.float32) / 255.0
    return model, images


def crops(image: np.ndarray, scales=SCALES, size: int = SIZE) -> np.ndarray:
    out = []
    for scale in scales:
        h, w = (int(round(d * scale)) for d in image.shape)
        if min(h, w) < size:
            continue
        img = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((w, h)),
                         np.float32) / 255.0
        for y in range(0, h - size + 1, 128):
            for x in range(0, w - size + 1, 160):
                patch = np.repeat(img[None, y:y + size, x:x + size], 3, axis=0)
                out.append((patch - MEAN) / STD)
    return np.stack(out).astype(np.float32)


def whole(image: np.ndarray, short: int = 736) -> np.ndarray:
    """The image at RapidOCR's scale (short side 736, long side a multiple of 32), and its
    mirror image: the detector needs the whole handwritten page of text.png as context."""
    w = int(round(image.shape[1] * short / image.shape[0] / 32)) * 32
    img = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((w, short)),
                     np.float32) / 255.0
    x = (np.repeat(img[None], 3, axis=0) - MEAN) / STD
    return np.stack([x, x[:, :, ::-1]]).astype(np.float32)


def text_map_iou(want: np.ndarray, have: np.ndarray, threshold: float = 0.3) -> float:
    a, b = want > threshold, have > threshold
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def datasets(images: dict[str, np.ndarray], split: float, crop: bool,
             size: int = SIZE) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration, evaluation, what they are): crops of page.png; text.png right of the
    column at ``split`` of its width (0: whole) evaluated; with ``crop``, text.png left of it
    cropped into the calibration too, at RapidOCR's scale as well (disjoint pixels)."""
    text, page = images["text"], images["page"]
    column = int(round(split * text.shape[1]))
    calib, what = crops(page, size=size), "calibration: crops of page.png"
    if crop:
        scales = (736 / text.shape[0], *SCALES[1:])
        calib = np.concatenate([calib, crops(text[:, :column], scales, size)])
        what += f" and of text.png's left {split:.0%}"
    return calib, whole(text[:, column:]), what + (
        f"; evaluation: text.png's right {1 - split:.0%}" if column else "; evaluation: text.png")


def plan_costs(result) -> list[tuple[float, float, list[str]]]:
    """(estimated loss, sparsity, producers) of every unit the plan cut, costliest first: its
    measured sensitivity read at the sparsity the plan gave it (linear between the probed
    levels, loss 1 at sparsity 1, as the allocation reads it)."""
    target = result.report.target
    sparsity = {g["id"]: g["sparsity"] for g in target.groups}
    producers = {g.id: g.producers for g in result.analysis.groups}
    costs = []
    for row in target.sensitivity:
        cut = max(sparsity.get(i, 0.0) for i in row["groups"])
        if cut > 0:
            loss = float(np.interp(cut, [0, *row["levels"], 1],
                                   [0, *row["loss"], max(row["loss"][-1], 1.0)]))
            costs.append((loss, cut, [p for i in row["groups"] for p in producers[i]]))
    return sorted(costs, key=lambda c: -c[0])


def group_table(result, top: int = 6) -> list[str]:
    """The units that cost the plan most by their measured sensitivity, with their losses."""
    producers = {g.id: g.producers for g in result.analysis.groups}
    measured = {tuple(p for i in r["groups"] for p in producers[i]): r
                for r in result.report.target.sensitivity}
    lines = []
    for loss, cut, names in plan_costs(result)[:top]:
        row = measured[tuple(names)]
        lines.append(f"  cost {loss:.3f} at sparsity {cut:.2f}: {'/'.join(names)} (losses at "
                     f"{'/'.join(f'{v:g}' for v in row['levels'])}: "
                     f"{' '.join(f'{v:.3f}' for v in row['loss'])})")
    return lines


def costliest_excluded(result, count: int) -> tuple[str, ...]:
    """Exact-name patterns for the producers of the ``count`` units that cost the plan most."""
    return tuple(f"^{re.escape(name)}$" for _, _, names in plan_costs(result)[:count]
                 for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.8,0.6,0.4", help="MACs kept, comma-separated")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="allocation/criterion/compensate/recover, comma-separated")
    parser.add_argument("--size", type=int, default=SIZE,
                        help="side of the calibration crops (the size the prune runs at)")
    parser.add_argument("--split", type=float, default=0.0, metavar="FRACTION",
                        help="evaluate text.png right of FRACTION of its width only")
    parser.add_argument("--crop", action="store_true",
                        help="calibrate on crops of text.png left of --split too")
    parser.add_argument("--exclude", action="append", default=[],
                        help="regex of producer node names left unpruned (repeatable)")
    parser.add_argument("--exclude-costliest", type=int, default=0, metavar="N",
                        help="repeat the first sensitivity run, its N costliest units whole")
    parser.add_argument("--no-refit-downstream", action="store_true",
                        help="sequential runs refit only the consumers of removed channels")
    parser.add_argument("--damping", type=float, default=sequential.DAMPING,
                        help="sequential's damping towards the layer's current weights")
    parser.add_argument("--recover-time", type=float, default=300.0)
    parser.add_argument("--latency", action="store_true", help="time the models at 640x640")
    parser.add_argument("--groups", action="store_true",
                        help="print the units that cost each sensitivity plan most")
    parser.add_argument("--cache", default="/tmp/onnx-fpgm-cache")
    args = parser.parse_args()
    runs = parse_runs(args.runs)
    if args.crop and not 0 < args.split < 1:
        parser.error("--crop needs --split between 0 and 1: the text it calibrates on")
    model_path, images = fetch(Path(args.cache))
    sequential.REFIT_DOWNSTREAM = not args.no_refit_downstream
    sequential.DAMPING = args.damping
    calib, held_out, what = datasets(images, args.split, args.crop, args.size)
    print(f"{what}: {len(calib)} {args.size}x{args.size} crops (upscaled), evaluation at "
          f"{held_out.shape[2]}x{held_out.shape[3]} and its mirror image; exclude "
          f"{args.exclude or '-'}")
    with tempfile.TemporaryDirectory() as work:  # this process's own: studies run side by side
        np.savez(Path(work) / "calib.npz", x=calib)
        np.savez(Path(work) / "eval.npz", x=held_out)
        study(args, runs, model_path, Path(work))


def study(args, runs, model_path: Path, work: Path) -> None:
    """Every run at every target, one table row each (and their groups with ``--groups``)."""
    original, _ = onnx_fpgm.model.io.load_model(model_path)
    evaluation = load_calibration(work / "eval.npz", original)
    reference = run_batched(make_session(original), original, evaluation)[0]
    print(f"original: text pixels (p > 0.3) {100 * np.mean(reference > 0.3):.1f}% of the "
          "evaluation images")
    print(f"{'target':>6} {'run':>34} {'MACs':>6} {'params':>6} {'IoU':>6} {'cosine':>7} "
          f"{'latency x':>9} {'time s':>6}")
    caches: dict[str, dict] = {}
    repeat = args.exclude_costliest  # once: the first sensitivity run of the first target
    for target in [float(t) for t in args.targets.split(",")]:
        queue = [(run, tuple(args.exclude), "") for run in runs]
        while queue:
            run, exclude, note = queue.pop(0)
            result = prune_and_score(original, run, target, exclude, note, args,
                                     work / "calib.npz", (reference, evaluation), caches)
            if result is not None and repeat and result.report.target.sensitivity:
                extra, repeat = costliest_excluded(result, args.exclude_costliest), 0
                names = ", ".join(name.strip("^$").replace("\\", "") for name in extra)
                queue.insert(0, (run, exclude + extra, f" -{args.exclude_costliest}"))
                print(f"  next: {run.label()} with {names} left whole", flush=True)


def prune_and_score(original, run, target, exclude, note, args, calibration: Path,
                    evaluated, caches):
    """One run pruned, evaluated and printed as a table row; its result (None if refused).
    Runs with the same allocation and criterion share one cache (sensitivities, scores)."""
    reference, evaluation = evaluated
    started = time.perf_counter()
    label = run.label() + note
    try:
        result = onnx_fpgm.prune(
            original, target_macs=target, allocation=run.allocation, criterion=run.criterion,
            compensate=run.compensate, recover=run.recover, recover_time=args.recover_time,
            exclude=exclude, calibration=str(calibration),
            input_shapes=(("x", (1, 3, args.size, args.size)),),
            cache=caches.setdefault(f"{run.allocation}/{run.criterion}", {}))
    except onnx_fpgm.OnnxFpgmError as err:
        print(f"{target:6.2f} {label:>34} {err}")
        return None
    elapsed = time.perf_counter() - started
    pruned = run_batched(make_session(result.model), original, evaluation)[0]
    cosine = float(np.sum(reference * pruned) / max(  # all-zero map: cosine 0
        np.linalg.norm(reference) * np.linalg.norm(pruned), 1e-30))
    speedup = "-"
    if args.latency:
        timed = onnx_fpgm.benchmark(original, result.model, runs=20,
                                    input_shapes={"x": (1, 3, 640, 640)})
        speedup = f"{timed.speedup:.2f}x"
    r = result.report
    note = "  " + recovery_note(r.recovery, "") if r.recovery else ""
    print(f"{target:6.2f} {label:>34} {r.after.macs / r.before.macs:6.3f} "
          f"{r.after.params / r.before.params:6.3f} {text_map_iou(reference, pruned):6.3f} "
          f"{cosine:7.4f} {speedup:>9} {elapsed:6.0f}{note}", flush=True)
    if args.groups and r.target is not None and r.target.sensitivity:
        print("\n".join(group_table(result)), flush=True)
    return result


if __name__ == "__main__":
    main()

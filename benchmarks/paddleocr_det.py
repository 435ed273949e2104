"""Real-model study: PaddleOCR's PP-OCRv4 text detector (as shipped in rapidocr-onnxruntime
1.4.4) pruned to MACs targets, on real text images that ship inside scikit-image.

Nothing is downloaded at run time by the tool: this script fetches the two wheels with
``pip download --no-deps`` into a cache directory (kept out of the repo) and reads the model
and ``skimage/data/page.png`` / ``text.png`` out of them. Calibration crops come from
page.png, evaluation on the whole text.png (disjoint images), grey replicated to RGB,
normalised and scaled as RapidOCR does. Task metric: IoU of the binarised text maps (probability >
0.3, DBNet's threshold) of the pruned model against the original's, over the evaluation images,
besides the cosine of the probability map.

    python benchmarks/paddleocr_det.py [--targets 0.8,0.6,0.4] [--cache /tmp/onnx-fpgm-cache]
"""
from __future__ import annotations

import argparse
import io as _io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration, run_batched
from onnx_fpgm.model.runtime import make_session

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
SKIMAGE = "scikit-image==0.26.0"
DET = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
SIZE = 224
#: RapidOCR's preprocessing (config.yaml): x / 255, mean 0.5, std 0.5; images are upscaled so
#: that the short side reaches 736 pixels, at which scale text is what the detector was made for.
MEAN, STD = 0.5, 0.5
SCALES = (736 / 191, 2.9, 2.2)


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


def crops(image: np.ndarray, scales=SCALES) -> np.ndarray:
    out = []
    for scale in scales:
        h, w = (int(round(d * scale)) for d in image.shape)
        if min(h, w) < SIZE:
            continue
        img = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((w, h)),
                         np.float32) / 255.0
        for y in range(0, h - SIZE + 1, 128):
            for x in range(0, w - SIZE + 1, 160):
                patch = np.repeat(img[None, y:y + SIZE, x:x + SIZE], 3, axis=0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.8,0.6,0.4")
    parser.add_argument("--allocations", default="uniform,global,sensitivity")
    parser.add_argument("--compensate", default="none", help="none or lstsq (in addition)")
    parser.add_argument("--cache", default="/tmp/onnx-fpgm-cache")
    args = parser.parse_args()
    model_path, images = fetch(Path(args.cache))
    cache = Path(args.cache)
    calib, held_out = crops(images["page"]), whole(images["text"])
    np.savez(cache / "det_calib.npz", x=calib)
    np.savez(cache / "det_eval.npz", x=held_out)
    print(f"calibration: {len(calib)} {SIZE}x{SIZE} crops of page.png (upscaled "
          f"{', '.join(f'{s:.2f}x' for s in SCALES)}); evaluation: text.png at "
          f"{held_out.shape[2]}x{held_out.shape[3]} and its mirror image")
    original, _ = onnx_fpgm.model.io.load_model(model_path)
    evaluation = load_calibration(cache / "det_eval.npz", original)
    reference = run_batched(make_session(original), original, evaluation)[0]
    print(f"original: text pixels (p > 0.3) {100 * np.mean(reference > 0.3):.1f}% of the "
          "evaluation images")
    shapes = (("x", (1, 3, SIZE, SIZE)),)
    modes = ["none"] + ([args.compensate] if args.compensate != "none" else [])
    print(f"{'target':>6} {'allocation':>11} {'comp':>5} {'MACs':>6} {'params':>6} "
          f"{'IoU':>6} {'cosine':>7} {'latency x':>9} {'time s':>6}")
    caches: dict[str, dict] = {}
    for target in [float(t) for t in args.targets.split(",")]:
        for allocation in args.allocations.split(","):
            for mode in modes:
                started = time.perf_counter()
                try:
                    result = onnx_fpgm.prune(
                        original, target_macs=target, allocation=allocation, compensate=mode,
                        calibration=str(cache / "det_calib.npz"), input_shapes=shapes,
                        cache=caches.setdefault(allocation, {}))
                except onnx_fpgm.OnnxFpgmError as err:
                    print(f"{target:6.2f} {allocation:>11} {mode:>5} {err}")
                    continue
                pruned = run_batched(make_session(result.model), original, evaluation)[0]
                cosine = float(np.sum(reference * pruned) / max(  # all-zero map: cosine 0
                    np.linalg.norm(reference) * np.linalg.norm(pruned), 1e-30))
                latency = onnx_fpgm.benchmark(original, result.model, runs=20,
                                              input_shapes={"x": (1, 3, 640, 640)})
                r = result.report
                print(f"{target:6.2f} {allocation:>11} {mode:>5} "
                      f"{r.after.macs / r.before.macs:6.3f} {r.after.params / r.before.params:6.3f} "
                      f"{text_map_iou(reference, pruned):6.3f} {cosine:7.4f} "
                      f"{latency.speedup:8.2f}x {time.perf_counter() - started:6.0f}", flush=True)


if __name__ == "__main__":
    main()

